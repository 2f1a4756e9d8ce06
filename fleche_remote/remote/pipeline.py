"""Several requests of one operation sent back to back on one connection.

Built on the connection's public requests (``request``, ``exchange``,
``try_exchange``, ``answer``): it needs nothing else of it.
"""

from __future__ import annotations

from typing import Any, Dict, Generator, List, Sequence

from .connection import Connection
from .exchange import Exchange


def pipelined(conn: Connection, op: str, args_list: Sequence[Dict[str, Any]]) -> Generator[Any, None, None]:
    """Send several requests back to back on ``conn``, then yield their
    plain results in order.

    The server answers one while the caller is still working through
    the previous answer, so the two ends overlap instead of taking
    turns: a listing of 1000 small calls split in 8 took 17 against
    21 ms over loopback ssh (both ends were busy about half the time
    while the other worked). All requests leave before the first answer
    is read, so over a slow link it still costs one round trip; when
    other threads hold most of the ``MAX_IN_FLIGHT`` slots, the answers
    already asked for are read first to free one, rather than waiting
    for a slot while holding them.

    Leaving early (an exception, or the caller closing the iterator)
    forgets the answers not read yet.
    """
    if len(args_list) == 1:  # one request takes the lone request's path
        yield conn.request(op, args_list[0])
        return
    sent: List[Exchange] = []  # in order, not answered yet
    todo = list(args_list)
    try:
        while todo or sent:
            if todo:
                # never wait for a slot while holding answers of our own:
                # with every slot taken, ours are read first, which frees one
                exchange = conn.try_exchange(op, todo[0]) if sent else conn.exchange(op, todo[0])
                if exchange is not None:
                    sent.append(exchange)
                    del todo[0]
                    continue
            yield conn.answer(sent.pop(0))  # forgotten, whatever happens
    finally:
        for exchange in sent:
            exchange.__exit__(None, None, None)


__all__ = ["pipelined"]
