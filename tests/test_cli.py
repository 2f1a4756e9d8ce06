"""Every ``fleche-remote`` command, run as ``python -m fleche_remote ...``
against a private sshd that plays the cluster (see ``cli_world.py``)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterator

import pytest
from cli_world import World, make_world

from fleche_remote import Cache, Call
from fleche_remote.cli import build_parser, main
from fleche_remote.testing import private_sshd

COMMANDS = ["serve", "config", "info", "doctor", "ls", "show", "evict", "gc", "pull", "push", "demo", "du"]


@pytest.fixture(scope="module")
def noisy_sshd() -> Iterator:
    """One sshd for this module, whose login shell prints a banner first."""
    with private_sshd(login_shell_noise="Welcome to the cluster!\n") as server:
        yield server


@pytest.fixture
def world(noisy_sshd, tmp_path) -> World:
    serve = f"exec {sys.executable} -m fleche_remote serve --read-only"
    ro = noisy_sshd.add_key(forced_command=f"cd {tmp_path / 'cluster'} && {serve}")
    return make_world(noisy_sshd, tmp_path, ro)


def _rows(stdout: str) -> list:
    return [line.split() for line in stdout.splitlines()[1:]]


# -- help and usage ---------------------------------------------------------------


def test_every_command_is_listed_and_has_help(capsys) -> None:
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(COMMANDS) <= set(choices)
    for command in choices:
        if command == "serve":
            continue
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: fleche-remote {command}" in capsys.readouterr().out


def test_usage_errors_exit_2_with_one_line(world) -> None:
    for argv, fragment in [
        (["ls", "nope"], "no cache named 'nope'"),
        (["ls", "shared:7"], "'shared' has 2 layers"),
        (["ls", "mirror:0"], "'mirror' is not a stack"),
        (["ls", "--since", "soon"], "--since 'soon'"),
        (["ls", "--where", "n"], "write ARG=VALUE"),
        (["evict", "--cache", "mirror"], "KEY... or filters"),
        (["frobnicate"], "invalid choice"),
    ]:
        done = world.run(*argv) if argv[0] == "ls" and argv[1] == "nope" else world.call(*argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert fragment in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr


# -- ls ---------------------------------------------------------------------------------


def test_ls_over_ssh_shows_key_name_arguments_size_age(world) -> None:
    done = world.run("ls", "cluster")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["KEY", "NAME", "ARGUMENTS", "SIZE", "AGE"]
    assert len(lines) == 1 + len(world.keys)
    simulate2 = next(line for line in lines if line.startswith(world.keys["work.simulate(2)"][:12]))
    assert "work.simulate" in simulate2 and "n=2, steps=1000" in simulate2
    # sorted by time: the three oldest are the simulate(n) of 2001
    assert [row[0] for row in _rows(done.stdout)[:3]] == [
        world.keys[f"work.simulate({n})"][:12] for n in (1, 2, 3)
    ]
    trap = next(line for line in lines if "work.trap" in line)
    assert "obj=<mkdir>" in trap
    assert not world.marker.exists(), "listing unpickled an argument"


def test_ls_names_match_unqualified_and_filters_combine(world) -> None:
    done = world.run("ls", "cluster", "--name", "simulate", "--no-header")
    names = sorted(row[1] for row in _rows("\n" + done.stdout))
    assert names == ["__main__.simulate"] + ["work.simulate"] * 3
    done = world.call("ls", "cluster", "--name", "work.simulate", "--where", "n=2", "--no-header")
    assert [row[0] for row in _rows("\n" + done.stdout)] == [world.keys["work.simulate(2)"][:12]]
    done = world.call("ls", "cluster", "--name", "imulate", "--no-header")
    assert done.stdout == ""  # a name matches whole dotted parts only
    recent = world.call("ls", "cluster", "--since", "1h", "--no-header")  # saved "in 2033": recent
    assert sorted(row[1] for row in _rows("\n" + recent.stdout)) == [
        "__main__.simulate",
        "work.other",
        "work.trap",
    ]
    done = world.call("ls", "cluster", "--since", "2010-01-01", "--json")
    assert sorted(e["name"] for e in json.loads(done.stdout)) == sorted(
        ["__main__.simulate", "work.other", "work.trap"]
    )


def test_ls_json_and_layer_column_of_a_stack_without_backfilling(world) -> None:
    local = world.local_cache()
    local.save(Call("work.simulate", {"n": 1, "steps": 1000}, list(range(10)), {"timestamp": 1e9 + 1}))
    local.save(Call("work.local_only", {"x": "abc"}, b"xyz", {"timestamp": 1e9}))
    local.close()
    done = world.run("ls", "--json")  # the default cache: the stack
    assert done.returncode == 0, done.stderr
    entries = {e["name"] + str(e["arguments"]): e for e in json.loads(done.stdout)}
    both = entries["work.simulate{'n': '1', 'steps': '1000'}"]
    assert both["layers"] == [0, 1] and both["key"] == world.keys["work.simulate(1)"]
    assert both["size"] > 0 and both["saved"].startswith("2001-09-09")
    assert entries["work.local_only{'x': \"'abc'\"}"]["layers"] == [0]
    assert entries["work.simulate{'n': '3', 'steps': '1000'}"]["layers"] == [1]
    table = world.call("ls").stdout.splitlines()
    assert table[0].split()[-1] == "LAYER"
    # listing did not copy anything into the local layer
    assert not world.local_cache().contains(world.keys["work.simulate(3)"])
    assert not world.marker.exists()


# -- show -------------------------------------------------------------------------------


def test_show_by_prefix_prints_record_metadata_and_result(world) -> None:
    key = world.keys["work.simulate(3)"]
    done = world.run("show", key[:8], "cluster")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert key in out and "work.simulate" in out
    assert "argument n" in out and "argument steps" in out
    assert "metadata timestamp  1000000003.0" in out
    assert "result" in out and "[0, 1, 2, 3" in out
    as_json = json.loads(world.call("show", key[:8], "cluster", "--json").stdout)
    assert as_json["arguments"] == {"n": "3", "steps": "1000"} and as_json["layers"] == [0]
    trap = world.call("show", world.keys["work.trap"][:10], "cluster", "--max-result-bytes", "0")
    assert "not loaded" in trap.stdout and "<mkdir>" in trap.stdout
    assert not world.marker.exists()
    missing = world.call("show", "0000000000", "cluster")
    assert missing.returncode == 1 and "nothing stored under" in missing.stderr


# -- evict and gc ------------------------------------------------------------------------


def test_evict_by_key_and_by_filters_then_gc(world) -> None:
    k1 = world.keys["work.simulate(1)"]
    done = world.run("evict", k1[:10], "--cache", "cluster")
    assert done.returncode == 0, done.stderr
    assert "evicted 1 call(s)" in done.stdout
    cluster = world.cluster_cache()
    assert not cluster.contains(k1)
    dry = world.call("evict", "--cache", "cluster", "--name", "simulate", "--dry-run")
    assert dry.stdout.count("would evict") == 3
    done = world.call("evict", "--cache", "cluster", "--name", "simulate", "--where", "n=2")
    assert done.returncode == 0 and not cluster.contains(world.keys["work.simulate(2)"])
    gc = world.run("gc", "cluster")
    assert gc.returncode == 0, gc.stderr
    # the values are minutes old: spared, as a save in progress would be
    assert gc.stdout.startswith("removed 0 unreferenced value(s) from cluster"), gc.stdout
    old = time.time() - 2 * Cache.GC_GRACE_SECONDS
    for path in (world.cluster / "store").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    gc = world.run("gc", "cluster")
    assert gc.returncode == 0, gc.stderr
    assert gc.stdout.startswith("removed 2 unreferenced value(s) from cluster"), gc.stdout
    assert cluster.contains(world.keys["work.simulate(3)"])


def test_evict_asks_for_many_and_is_refused_read_only(world) -> None:
    cluster = world.cluster_cache()
    for n in range(10):
        cluster.save(Call("work.many", {"n": n}, n))
    done = world.run("evict", "--cache", "cluster", "--name", "many")  # no terminal to ask on
    assert done.returncode == 2 and "pass --yes" in done.stderr
    assert len(list(cluster.query_records("work.many"))) == 10
    for answer, code, left in ((b"n\n", 2, 10), (b"y\n", 0, 0)):  # asked on a terminal
        master, slave = os.openpty()
        try:
            os.write(master, answer)
            done = world.run("evict", "--cache", "cluster", "--name", "many", stdin=slave)
        finally:
            os.close(master)
            os.close(slave)
        assert "evict 10 calls from cluster? [y/N]" in done.stderr
        assert done.returncode == code and len(list(cluster.query_records("work.many"))) == left
    for n in range(6):
        cluster.save(Call("work.many", {"n": n}, n))
    done = world.call("evict", "--cache", "cluster", "--name", "many", "--yes")
    assert done.returncode == 0 and "evicted 6" in done.stdout
    refused = world.run("evict", world.keys["work.other(1)"], "--cache", "ro")
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert cluster.contains(world.keys["work.other(1)"])


# -- pull and push -------------------------------------------------------------------------


def test_pull_copies_what_is_missing_and_a_rerun_resumes(world) -> None:
    # a first, partial pull (as if interrupted after the simulate calls)
    done = world.run("pull", "cluster", "mirror", "--name", "simulate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("copied 4 entries")
    dry = world.call("pull", "cluster", "mirror", "--dry-run")
    assert "would copy 2 of 6 entries" in dry.stdout and "4 already there" in dry.stdout
    again = world.call("pull", "cluster", "mirror", "--json")
    summary = json.loads(again.stdout)
    assert summary["copied"] == 2 and summary["already_there"] == 4
    mirror = world.local_cache("mirror")
    for key in world.keys.values():
        assert mirror.contains(key)
    assert mirror.load_value(world.keys["work.simulate(3)"]) == list(range(30))
    assert not world.marker.exists()  # copies move bytes; nothing unpickled
    nothing = world.call("pull", "cluster", "mirror")
    assert "copied 0 entries" in nothing.stdout and "6 already there" in nothing.stdout


def test_push_into_a_stack_layer_with_a_progress_bar(world) -> None:
    mirror = world.local_cache("mirror")
    big = mirror.save(Call("work.big", {"n": 9}, bytes(9 << 20), {"timestamp": 2e9}))
    mirror.close()
    done = world.run("push", "mirror", "shared:1", "--progress")
    assert done.returncode == 0, done.stderr
    assert "copied 1 entry (9.0 MiB)" in done.stdout
    assert "copy" in done.stderr and "100%" in done.stderr  # tqdm drew the bar on stderr
    assert world.cluster_cache().load_value(big) == bytes(9 << 20)
    refused = world.run("push", "mirror", "ro")
    assert refused.returncode == 2 and "ro is read-only" in refused.stderr


# -- info and doctor -------------------------------------------------------------------------


def test_info_of_an_adhoc_host_and_of_a_stack(world) -> None:
    done = world.run("info", world.sshd.host, *world.adhoc())
    assert done.returncode == 0, done.stderr
    rows = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert rows["cwd"] == str(world.cluster)
    assert rows["read_only"] == "false"
    assert "cloudpickle" in [v for k, v in rows.items() if k.startswith("cache.")]
    assert rows["login_noise"].startswith("Welcome to the cluster!")
    data = json.loads(world.call("info", "shared", "--json").stdout)
    assert data[0]["cache"]["values"]["type"] == "cloudpickle" and data[1]["cwd"] == str(world.cluster)
    ro = json.loads(world.call("info", "ro", "--json").stdout)
    assert ro["read_only"] is True


def test_doctor_passes_a_good_setup_and_reports_noise_and_speed(world) -> None:
    done = world.run("doctor", "cluster", "--bytes", str(4 << 20))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for check in ("ssh", "python", "package", "fleche.toml", "server", "cache", "read-only", "latency"):
        assert f"ok    {check}" in out, (check, out)
    assert str(world.cluster / "fleche.toml") in out
    assert "warn  login noise" in out and "fix:" in out
    assert "ok    upload" in out and "MiB/s" in out and "ok    download" in out
    assert "ok    size" in out and "call(s)" in out  # the remote cache's size, and its limits
    assert out.rstrip().endswith("0 failed, 1 warning(s), 12 checks")


def test_doctor_fails_with_a_fix_for_a_missing_python(world) -> None:
    done = world.run("doctor", world.sshd.host, *world.adhoc(), "--python", "/nowhere/python3", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed and failed[0]["check"] == "python" and "python" in failed[0]["fix"]


def test_doctor_through_a_forced_read_only_key(world) -> None:
    done = world.run("doctor", "ro", "--bytes", str(1 << 20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forced command" in done.stdout
    assert "ok    read-only    yes" in done.stdout


def test_unreachable_host_fails_doctor_and_info(world) -> None:
    options = ["--ssh-options", "-F /dev/null -p 1 -o BatchMode=yes -o ConnectTimeout=5"]
    done = world.run("doctor", "nobody@127.0.0.1", *options)
    assert done.returncode == 1 and "FAIL  ssh" in done.stdout and "fix:" in done.stdout
    info = world.call("info", "nobody@127.0.0.1", *options)
    assert info.returncode == 1 and info.stderr.startswith("fleche-remote: error:")


# -- demo ----------------------------------------------------------------------------------


def test_demo_shows_misses_hits_over_ssh_and_backfill(world) -> None:
    done = world.run("demo", "-n", "1", "2", "--work-seconds", "0.05")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("miss, computed") == 2
    assert out.count("hit, fetched over ssh") == 2 and "back-filled into the local layer" in out
    assert out.count("hit, local layer") == 2
    assert out.rstrip().splitlines()[-1].startswith("done in")


def test_main_in_process_returns_exit_codes(world, capsys, monkeypatch) -> None:
    monkeypatch.chdir(world.laptop)
    assert main(["ls", "mirror"]) == 0
    assert capsys.readouterr().out.split() == ["KEY", "NAME", "ARGUMENTS", "SIZE", "AGE"]
    assert main(["show", "abc", "mirror"]) == 1
    assert "nothing stored under abc" in capsys.readouterr().err


def test_doctor_against_a_bare_python_reports_the_bootstrap(tmp_path) -> None:
    """A remote with nothing but CPython 3.9: the package check says the
    server runs the code the client sent, and fleche.toml is still found."""
    import glob
    import os
    import shlex
    import subprocess

    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9.*/bin/python3.9")))
    if not found:
        pytest.fail("no pyenv Python 3.9 (~/.pyenv/versions/3.9.*) for the zero-install doctor test")
    (tmp_path / "fleche.toml").write_text(
        '[default]\ncache = "r"\nroot = true\n[r]\ntemplate = "pickle"\nroot = "c"\n'
    )
    with private_sshd(env={"PYTHONPATH": None}) as bare:
        options = " ".join(shlex.quote(o) for o in bare.ssh_options)
        argv = [sys.executable, "-m", "fleche_remote", "doctor", bare.host, "--python", found[-1]]
        argv += ["--workdir", str(tmp_path), "--bytes", "0", "--ssh-options", options]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Python 3.9." in done.stdout
    assert "not installed; the server runs the code this client sent; bootstrap = auto" in done.stdout
    assert f"ok    fleche.toml  {tmp_path / 'fleche.toml'}" in done.stdout
