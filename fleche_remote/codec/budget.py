"""Budgets for decoding stored pickles: checked before anything is built.

A pickle is a program for a small stack machine, and a few hundred bytes
of it can ask for a great deal: ``LONG_BINPUT 2**27-1`` makes the C
unpickler grow its memo to that index (2 GiB); 64 tuples that each hold
the one before twice make a structure of 2**64 paths, which ``hash`` (a
dict key, a set member) walks in full; 100,000 nested tuples are decoded
fine, and then overflow the stack of the first ``repr`` or comparison; a
9,600-digit integer cannot even be printed. Stored records come from
whoever can write to a shared directory or hold an append-only key, so
none of that may reach the unpickler.

:func:`check_pickle` runs the pickle machine on *sizes* instead of
objects: every value on the stack is a ``[paths, depth]`` pair (how many
nodes a full walk of it visits, how deeply it nests), containers add up
their items, the memo shares the pair and so shares the count. It reads
each opcode once, allocates nothing in proportion to what the pickle
claims, and refuses the pickle (:class:`~fleche_remote.errors.ProtocolError`)
as soon as a :class:`Budget` is exceeded. Only then may an unpickler run.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional

from ..errors import ProtocolError


@dataclass(frozen=True)
class Budget:
    """What one decoded pickle may cost.

    The defaults fit a call record (a name, a few digests, metadata, and the
    arguments as opaque bytes) a thousand times over, and bound the work of
    hashing, comparing or printing what comes out.
    """

    #: Nodes a full walk of any value visits, shared parts counted each time
    #: they are reached: bounds ``hash``, ``==``, ``repr`` and JSON output.
    max_nodes: int = 1_000_000
    #: Nesting depth of containers: far below the interpreter's recursion limit.
    max_depth: int = 100
    #: Memo slots (the C unpickler allocates up to the largest index used).
    max_memo: int = 1_000_000
    #: Bytes of one integer (LONG1/LONG4; about 2.4 digits a byte): printing
    #: an int past 4,300 digits raises in Python 3.11+.
    max_int_bytes: int = 1024
    #: Items on the stack at once (MARK ... TUPLE holds them all).
    max_stack: int = 1_000_000


#: For records read from a store and plain messages: the defaults.
RECORD_BUDGET = Budget()

_I4 = struct.Struct("<i")
_U4 = struct.Struct("<I")
_U8 = struct.Struct("<Q")

# opcodes that push one atom and take no argument
_PUSH0 = set(b"N\x88\x89])}\x8f\x97")
# fixed-size argument, push one atom: opcode -> argument bytes
_PUSH_FIXED = {ord("J"): 4, ord("K"): 1, ord("M"): 2, ord("G"): 8, 0x82: 1, 0x83: 2, 0x84: 4}
# counted strings and bytes: opcode -> (length struct size, signed)
_COUNTED = {
    ord("T"): 4, ord("U"): 1, ord("X"): 4, 0x8C: 1, 0x8D: 8,
    ord("B"): 4, ord("C"): 1, 0x8E: 8, 0x96: 8,
}  # fmt: skip
# newline-terminated argument, push one atom
_PUSH_LINE = set(b"IFSVLP")
# take items down to the last MARK and push one container
_FROM_MARK = set(b"tld\x91o")
# take items down to the last MARK and add them to the container below it
_ADD_FROM_MARK = set(b"eu\x90")
_NOOP = {0x98, 0x99}


def _refuse(what: str, pos: int) -> ProtocolError:
    return ProtocolError(f"refusing to decode a pickle: {what} (at byte {pos})")


def check_pickle(data: bytes | bytearray | memoryview, budget: Budget = RECORD_BUDGET) -> None:
    """Refuse ``data`` unless decoding it stays within ``budget``.

    Raises:
        ProtocolError: the pickle is malformed, or would exceed the budget;
            the message names which limit and where.
    """
    # bytes and bytearray index and find in place; a memoryview is copied once
    view = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B").tobytes()
    end = len(view)
    pos = 0
    stack: List[Optional[List[int]]] = []  # None is a MARK
    memo: dict[int, List[int]] = {}
    memo_next = 0  # MEMOIZE's implicit index
    max_nodes, max_depth = budget.max_nodes, budget.max_depth

    def need(n: int) -> int:
        nonlocal pos
        if pos + n > end:
            raise _refuse(f"truncated: {n} more bytes needed, {end - pos} left", pos)
        start = pos
        pos += n
        return start

    def line() -> bytes:
        nonlocal pos
        stop = view.find(b"\n", pos)
        if stop < 0:
            raise _refuse("an unterminated text argument", pos)
        text = bytes(view[pos:stop])
        pos = stop + 1
        return text

    def pop_mark() -> List[List[int]]:
        items: List[List[int]] = []
        while stack:
            item = stack.pop()
            if item is None:
                return items
            items.append(item)
        raise _refuse("a container without its MARK", pos)

    def pop() -> List[int]:
        if not stack or stack[-1] is None:
            raise _refuse("an opcode with too few items on the stack", pos)
        item = stack.pop()
        assert item is not None
        return item

    def combine(items: List[List[int]]) -> List[int]:
        size = 1
        depth = 0
        for s, d in items:
            size += s
            if d > depth:
                depth = d
        node = [size, depth + 1]
        check(node)
        return node

    def check(node: List[int]) -> None:
        if node[0] > max_nodes:
            raise _refuse(f"a value of more than {max_nodes:,} nodes (shared parts counted each time)", pos)
        if node[1] > max_depth:
            raise _refuse(f"values nested more than {max_depth} deep", pos)

    def add_into(items: List[List[int]]) -> None:
        if not stack or stack[-1] is None:
            raise _refuse("items added to nothing", pos)
        target = stack[-1]
        for s, d in items:
            target[0] += s
            if d + 1 > target[1]:
                target[1] = d + 1
        check(target)

    # opcodes are compared as int literals: ord() in the loop cost ~60 % of
    # the walk of a small message (one call per comparison)
    while True:
        if pos >= end:
            raise _refuse("no STOP opcode", pos)
        op = view[pos]
        pos += 1
        if op == 0x94:  # MEMOIZE, after nearly every object: the fast path
            if not stack or stack[-1] is None:
                raise _refuse("memoizing nothing", pos)
            if memo_next >= budget.max_memo:
                raise _refuse(f"more than {budget.max_memo:,} memo entries", pos)
            memo[memo_next] = stack[-1]  # type: ignore[assignment]
            memo_next += 1
            continue
        if op == 0x8C:  # SHORT_BINUNICODE: names, keys, digests
            if pos >= end:
                raise _refuse("truncated", pos)
            pos += 1 + view[pos]
            if pos > end:
                raise _refuse("a string past the end of the pickle", pos)
            stack.append([1, 0])
            continue
        if op in _PUSH0:
            stack.append([1, 0])
        elif op in _PUSH_FIXED:
            need(_PUSH_FIXED[op])
            stack.append([1, 0])
        elif op in _COUNTED:
            width = _COUNTED[op]
            start = need(width)
            raw = bytes(view[start : start + width])
            if width == 1:
                n = raw[0]
            elif width == 4:
                n = _I4.unpack(raw)[0] if op == 0x54 else _U4.unpack(raw)[0]
            else:
                n = _U8.unpack(raw)[0]
            if n < 0 or n > end - pos:
                raise _refuse(f"a {n}-byte string in {end - pos} remaining bytes", pos)
            pos += n
            stack.append([1, 0])
        elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
            width = 1 if op == 0x8A else 4
            start = need(width)
            n = view[start] if width == 1 else _I4.unpack(bytes(view[start : start + 4]))[0]
            if n < 0 or n > budget.max_int_bytes:
                raise _refuse(f"an integer of {n} bytes (at most {budget.max_int_bytes})", pos)
            need(n)
            stack.append([1, 0])
        elif op in _PUSH_LINE:
            text = line()
            if op in b"IL" and len(text) > budget.max_int_bytes * 2:
                raise _refuse(f"an integer of {len(text)} digits", pos)
            stack.append([1, 0])
        elif op == 0x63:  # GLOBAL module\nname\n
            line()
            line()
            stack.append([1, 0])
        elif op == 0x69:  # INST module\nname\n, arguments from MARK
            line()
            line()
            stack.append(combine(pop_mark()))
        elif op == 0x28:  # MARK
            stack.append(None)
        elif op == 0x30:  # POP
            if not stack:
                raise _refuse("POP of an empty stack", pos)
            stack.pop()
        elif op == 0x31:  # POP_MARK
            pop_mark()
        elif op == 0x32:  # DUP
            top = pop()
            stack += [top, top]
        elif op == 0x2E:  # STOP
            return
        elif op in (0x70, 0x71, 0x72, 0x94):  # PUT, BINPUT, LONG_BINPUT, MEMOIZE
            if op == 0x70:
                text = line()
                try:
                    index = int(text)
                except ValueError:
                    raise _refuse(f"a memo index {text[:20]!r}", pos) from None
            elif op == 0x71:
                index = view[need(1)]
            elif op == 0x72:
                start = need(4)
                index = _U4.unpack(bytes(view[start : start + 4]))[0]
            else:
                index = memo_next
            # an honest pickler numbers its memo 0, 1, 2, ...: a far index
            # only serves to make the C unpickler allocate up to it
            if index < 0 or index > memo_next or index >= budget.max_memo:
                raise _refuse(f"memo index {index} where the next is {memo_next}", pos)
            if not stack or stack[-1] is None:
                raise _refuse("memoizing nothing", pos)
            memo[index] = stack[-1]  # type: ignore[assignment]
            if index == memo_next:
                memo_next += 1
        elif op in (0x67, 0x68, 0x6A):  # GET, BINGET, LONG_BINGET
            if op == 0x67:
                text = line()
                try:
                    index = int(text)
                except ValueError:
                    raise _refuse(f"a memo index {text[:20]!r}", pos) from None
            elif op == 0x68:
                index = view[need(1)]
            else:
                start = need(4)
                index = _U4.unpack(bytes(view[start : start + 4]))[0]
            node = memo.get(index)
            if node is None:
                raise _refuse(f"memo index {index} was never stored", pos)
            stack.append(node)
        elif op in _FROM_MARK:
            stack.append(combine(pop_mark()))
        elif op in (0x85, 0x86, 0x87):  # TUPLE1..3
            items = [pop() for _ in range(op - 0x84)]
            stack.append(combine(items))
        elif op in _ADD_FROM_MARK:
            items = pop_mark()
            add_into(items)
        elif op == 0x61:  # APPEND
            add_into([pop()])
        elif op == 0x73:  # SETITEM
            value, key = pop(), pop()
            add_into([key, value])
        elif op == 0x62:  # BUILD: state into the object below
            add_into([pop()])
        elif op in (0x52, 0x81, 0x93):  # REDUCE, NEWOBJ, STACK_GLOBAL
            stack.append(combine([pop(), pop()]))
        elif op == 0x92:  # NEWOBJ_EX
            stack.append(combine([pop(), pop(), pop()]))
        elif op == 0x51:  # BINPERSID
            stack.append(combine([pop()]))
        elif op == 0x80:  # PROTO
            need(1)
        elif op == 0x95:  # FRAME: a length prefix for what follows
            start = need(8)
            n = _U8.unpack(bytes(view[start : start + 8]))[0]
            if n > end - pos:
                raise _refuse(f"a frame of {n} bytes in {end - pos} remaining", pos)
        elif op in _NOOP:
            pass
        else:
            raise _refuse(f"unknown opcode {op:#04x}", pos - 1)
        if len(stack) > budget.max_stack:
            raise _refuse(f"more than {budget.max_stack:,} items on the stack", pos)


__all__ = ["RECORD_BUDGET", "Budget", "check_pickle"]
