"""Each point computed once: two laptops sweeping the same points at once,
and a rerun while the first sweep's points are still running, attach to
the points already being computed instead of submitting them again."""

from __future__ import annotations

import threading
from pathlib import Path

from fleche_remote import cached

from . import sweeps
from .support import host_dir, laptop


def test_two_laptops_mapping_the_same_points_compute_each_once(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "local"\nworkers = 2')
    points = list(range(6))
    answers: dict = {}

    def sweep(name: str) -> None:
        stack = laptop(sshd, tmp_path, host)
        try:
            answers[name] = cached(cache=stack)(sweeps.counted).map(
                points, on=stack.layers[1], progress=False
            )
        finally:
            stack.close()

    threads = [threading.Thread(target=sweep, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == {"a": points, "b": points}
    assert sorted(int(x) for x in (host / "computed.log").read_text().split()) == points


def test_a_rerun_while_the_points_run_attaches_to_them(sshd, tmp_path: Path) -> None:
    host = host_dir(tmp_path, 'executor = "local"\nworkers = 1')
    first = laptop(sshd, tmp_path, host)
    f = cached(cache=first)(sweeps.counted)
    try:
        records_todo = {f.key(x): ((x,), {}, f.arguments(x)) for x in range(4)}
        from fleche_remote.compute.submit import pack_function, pack_points

        records, arguments = pack_points(f, records_todo)
        about = {"name": f.name, "module": sweeps.__name__, "qualname": "counted", "strict": False}
        # the first laptop submits and goes away without waiting
        first.layers[1].compute_submit(pack_function(sweeps.counted), about, records, arguments)
    finally:
        first.close()
    again = laptop(sshd, tmp_path, host)
    try:
        assert cached(cache=again)(sweeps.counted).map(range(4), on=again.layers[1], progress=False) == [
            0,
            1,
            2,
            3,
        ]
    finally:
        again.close()
    assert sorted(int(x) for x in (host / "computed.log").read_text().split()) == [0, 1, 2, 3]
    assert len(list((tmp_path / "jobs" / "run").iterdir())) == 1  # the rerun submitted nothing new
