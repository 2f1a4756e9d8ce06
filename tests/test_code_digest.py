"""Code in the key, proven through real processes: a module file is written,
a fresh Python imports it and calls the cached function, the file is edited,
and another fresh Python calls again. Whether the second one computed is
what a user would check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from fleche_remote.codec.code import code_digest, normalized_tokens

REPO = Path(__file__).resolve().parent.parent

#: Run in a fresh process: call ``name`` of module ``mod`` with ``arg``
#: (``rerun`` calls f.rerun), report the result, the key, and whether it ran.
RUNNER = textwrap.dedent(
    """
    import json, logging, sys, warnings
    warnings.simplefilter("always")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    import importlib
    from fleche_remote.config import cache_from_config
    from fleche_remote.cached import CachedFunction
    mod = importlib.import_module(sys.argv[1])
    f = getattr(mod, sys.argv[2])
    f._cache = cache_from_config({"template": "cloudpickle", "root": sys.argv[3]})
    f._cache_spec = f._cache
    ran = []
    inner = f.func
    def counting(*a, **k):
        ran.append(a)
        return inner(*a, **k)
    counting.__wrapped__ = inner
    f.func = counting
    arg = json.loads(sys.argv[4])
    key = f.key(arg)
    result = f.rerun(arg) if sys.argv[5] == "rerun" else f(arg)
    code = f.code
    shown = repr(result) if isinstance(result, list) else result
    print(json.dumps({"result": shown, "key": key, "ran": len(ran), "version": f.version,
                      "parts": code.parts if code else None}))
    """
)


class Project:
    """A directory of module files and a cache, run by fresh interpreters."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        (root / "src").mkdir(parents=True)

    def write(self, module: str, source: str) -> None:
        path = self.root / "src" / f"{module}.py"
        path.write_text(textwrap.dedent(source))
        for pyc in (self.root / "src" / "__pycache__").glob(f"{module}.*"):
            pyc.unlink()  # same-second edits must not reuse stale bytecode

    def call(
        self, module: str, name: str = "f", arg: Any = 1, python: str = sys.executable, rerun: bool = False
    ) -> Dict[str, Any]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(self.root / "src")]))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        how = "rerun" if rerun else "call"
        argv = [python, "-c", RUNNER, module, name, str(self.cache), json.dumps(arg), how]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd=self.root)
        assert proc.returncode == 0, f"{python} failed:\n{proc.stderr}"
        out: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        out["log"] = proc.stderr
        return out


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


BASE = """
from fleche_remote import cached

SCALE = 10

def helper(x):
    return x * SCALE

@cached
def f(x):
    \"\"\"Scale x.\"\"\"
    return helper(x) + 1
"""


def edited(source: str, old: str, new: str) -> str:
    assert old in source, old
    return source.replace(old, new)


def test_a_second_process_finds_the_result_of_unchanged_code(project: Project) -> None:
    project.write("m", BASE)
    first = project.call("m")
    second = project.call("m")
    assert (first["result"], first["ran"]) == (11, 1)
    assert (second["result"], second["ran"], second["key"]) == (11, 0, first["key"])
    assert second["version"].startswith("code:")
    assert set(second["parts"]) == {"m.f", "m.helper", "m.SCALE"}


@pytest.mark.parametrize(
    ("what", "old", "new", "result", "part"),
    [
        ("body", "return helper(x) + 1", "return helper(x) + 2", 12, "m.f changed"),
        ("helper", "return x * SCALE", "return x * SCALE * 2", 21, "m.helper changed"),
        ("constant", "SCALE = 10", "SCALE = 100", 101, "m.SCALE changed"),
    ],
)
def test_an_edit_of_code_it_reaches_computes_again_and_says_why(
    project: Project, what: str, old: str, new: str, result: int, part: str
) -> None:
    project.write("m", BASE)
    before = project.call("m")
    project.write("m", edited(BASE, old, new))
    after = project.call("m")
    assert (after["result"], after["ran"]) == (result, 1), what
    assert after["key"] != before["key"]
    assert after["log"].count("m.f computes:") == 1, after["log"]
    assert part in after["log"], after["log"]
    # the old code's result is still there, under its old key
    project.write("m", BASE)
    back = project.call("m")
    assert (back["result"], back["ran"], back["key"]) == (11, 0, before["key"])


@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        ("comment", "return helper(x) + 1", "return helper(x) + 1  # plus one"),
        ("docstring", '"""Scale x."""', '"""Scale x, then add one:\n    a longer story."""'),
        ("formatting", "return helper(x) + 1", "return helper( x )+\\\n            1"),
        ("indentation", "    return x * SCALE", "        return x * SCALE"),
        ("blank lines", "def helper(x):\n", "\n\ndef helper(x):\n\n"),
        ("helper docstring", "def helper(x):\n", 'def helper(x):\n    "new doc"\n'),
    ],
)
def test_comments_docstrings_and_formatting_do_not_count(
    project: Project, what: str, old: str, new: str
) -> None:
    project.write("m", BASE)
    before = project.call("m")
    project.write("m", edited(BASE, old, new))
    after = project.call("m")
    assert (after["ran"], after["key"]) == (0, before["key"]), what


def test_an_edited_cached_helper_changes_its_callers_key(project: Project) -> None:
    source = """
    from fleche_remote import cached

    @cached
    def inner(x):
        return x + 1

    @cached
    def f(x):
        return inner(x) * 2
    """
    project.write("m", source)
    before = project.call("m")
    project.write("m", edited(source, "return x + 1", "return x + 5"))
    after = project.call("m")
    assert (before["result"], after["result"], after["ran"]) == (4, 12, 1)
    assert after["key"] != before["key"]


def test_helpers_in_other_user_modules_count_through_module_attributes(project: Project) -> None:
    project.write("util", "def twice(x):\n    return 2 * x\n")
    source = "import util\nimport json\nfrom fleche_remote import cached\n\n@cached\ndef f(x):\n"
    source += "    return util.twice(x)\n"
    project.write("m", source)
    before = project.call("m")
    assert set(before["parts"]) == {"m.f", "util.twice"}  # json is not the user's code
    project.write("util", "def twice(x):\n    return x + x + 0\n")
    after = project.call("m")
    assert (after["ran"], after["result"]) == (1, 2)
    assert "util.twice changed" in after["log"]


def test_version_pins_the_key_and_hash_code_false_ignores_the_code(project: Project) -> None:
    for decorator in ("@cached(version='2')", "@cached(hash_code=False)"):
        source = f"from fleche_remote import cached\n\n{decorator}\ndef f(x):\n    return x + 1\n"
        project.write("m", source)
        before = project.call("m")
        project.write("m", edited(source, "x + 1", "x + 2"))
        after = project.call("m")
        assert (after["ran"], after["result"], after["key"]) == (0, 2, before["key"]), decorator
        assert after["parts"] is None
    assert before["version"] is None and after["version"] is None


def test_rerun_computes_again_and_replaces_the_stored_result(project: Project) -> None:
    source = "import random\nfrom fleche_remote import cached\n\n@cached\ndef f(x):\n"
    source += "    return random.random()\n"
    project.write("m", source)
    first = project.call("m")
    hit = project.call("m")
    again = project.call("m", rerun=True)
    after = project.call("m")
    assert hit["result"] == first["result"] and hit["ran"] == 0
    assert again["ran"] == 1 and again["result"] != first["result"]
    assert (after["ran"], after["result"], after["key"]) == (0, again["result"], first["key"])


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_the_same_key_on_every_supported_python(
    project: Project, other_pythons: Dict[str, str], version: str
) -> None:
    source = textwrap.dedent(
        '''
        import math
        from fleche_remote import cached

        TABLE = (("a", (1, 2.5)), ("b", None), frozenset({3, 4}))
        runs = {"count": 0}  # state, not a constant: not in the key

        class Model:
            """A model."""
            def score(self, x):
                return x * len(TABLE)

        def label(x):
            return f"{x!r:>8} {math.pi:.2f} {Model().score(x)}" + 'é' + """
        done"""

        @cached
        def f(x):
            # café
            runs["count"] += 1
            return [label(x), TABLE[0], b"raw", r"\\d+", 0x1F, 1_000]
        '''
    )
    project.write("m", source)
    here = project.call("m")
    there = project.call("m", python=other_pythons[version])
    assert there["ran"] == 0 and there["key"] == here["key"] and there["parts"] == here["parts"]
    assert set(here["parts"]) == {"m.f", "m.label", "m.Model", "m.TABLE"}


def test_no_source_warns_once_at_the_decorator_and_keys_by_name(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        from fleche_remote import cached
        from fleche_remote.caches import Cache
        from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore
        store = Cache(MemoryValueStore(), MemoryCallStore())
        namespace = {"__name__": "__main__", "cached": cached, "store": store}
        # code typed at a prompt, or built at run time: no file holds its source
        typed = "x = 1\\n@cached(cache=store)\\ndef g(x):\\n    return x\\n"
        exec(compile(typed, "<typed>", "exec"), namespace)
        g = namespace["g"]
        print(g(1), g(2), g.version, g.code)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-c", script]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2", "None", "None"]
    assert proc.stderr.count("CodeDigestWarning") == 1, proc.stderr
    assert "<typed>:2:" in proc.stderr and "cannot read the source of __main__.g" in proc.stderr


# -- the normal form, in this process -----------------------------------------


def tokens(source: str) -> Any:
    return normalized_tokens(textwrap.dedent(source))


def test_quote_style_and_string_spelling_do_not_count_but_values_do() -> None:
    assert tokens("x = 'a'\n") == tokens('x = "a"\n') == tokens('x = """a"""\n')
    assert tokens("x = 'a'\n") != tokens("x = 'b'\n")
    assert tokens("x = f'{a}'\n") != tokens("x = f'{b}'\n")
    assert tokens("x = 1\n") != tokens("x = 2\n")


def test_decorators_are_not_code() -> None:
    plain = "def f(x):\n    return x\n"
    assert tokens(plain) == tokens("@cached(cache='other')\n" + plain)


def test_stdlib_and_installed_packages_are_not_followed_unless_deps() -> None:
    import json as json_module

    import numpy

    def f(x: Any) -> Any:
        return json_module.dumps(numpy.asarray(x).tolist())

    assert set(code_digest(f).parts) == {f"{__name__}.{f.__qualname__}"}
    with_deps = code_digest(f, deps=True)
    assert "package numpy" in with_deps.parts and "package json" not in with_deps.parts
    assert with_deps.digest != code_digest(f).digest


def test_cycles_end() -> None:
    source = {"ping": None}

    def ping(n: int) -> Optional[int]:
        return pong(n - 1) if n else source["ping"]

    def pong(n: int) -> Optional[int]:
        return ping(n)

    parts = code_digest(ping).parts
    assert {f"{__name__}.{ping.__qualname__}", f"{__name__}.{pong.__qualname__}"} <= set(parts)


def test_ls_and_show_print_the_code_that_computed_a_call(project: Project) -> None:
    project.write("m", BASE)
    made = project.call("m")
    (project.root / "fleche.toml").write_text(
        f'[results]\ntemplate = "cloudpickle"\nroot = "{project.cache}"\n'
    )
    env = dict(os.environ, HOME=str(project.root), PYTHONPATH=str(REPO))
    env.pop("XDG_CONFIG_HOME", None)

    def cli(*argv: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "fleche_remote", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=project.root,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    short = made["version"][len("code:") :][:12]
    listing = cli("ls", "results", "--code")
    assert "CODE" in listing.splitlines()[0] and short in listing
    shown = cli("show", made["key"][:12], "results")
    assert short in shown and "m.helper" in shown and "m.SCALE" in shown
