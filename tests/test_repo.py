"""Repository hygiene: no import cycles among the project's modules, the loader below the exporters, and no
absolute path of any machine (a checkout, temp or home folder) in a tracked file."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ptq", "cli", "calib")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its body (top level or inside functions)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                for a in node.names:  # `from ptq import export` imports the submodule ptq.export
                    deps.add(resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base))
        graph[mod] = {d for d in deps if d and d != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = import_graph(_modules())
    assert "cli.common" in graph["cli.export_cmd"] and "ptq.model_io" in graph["ptq.export.base"]  # graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_loader_and_primitives_do_not_import_upward():
    graph = import_graph(_modules())
    upper = ("ptq.export", "ptq.passes", "ptq.compress", "ptq.pipeline", "cli")
    for low in ["ptq.model_io", "ptq.layermap"] + [m for m in graph if m.startswith("ptq.quant")]:
        bad = sorted(d for d in graph[low] if d.startswith(upper))
        assert not bad, f"{low} imports {bad} (a higher floor)"


# An absolute path of one machine: a checkout or scratch folder (top-level work, tmp, mnt, var/folders) or a home
# (root, home/<user>, Users/<user>). Not preceded by a word character, '.', '~' or '$' (so URLs, `~/.cache` and
# `$PTQ_DATA/...` pass).
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|tmp|mnt|root|var/folders|home/[\w.-]+|Users/[\w.-]+)(?=/|\b)")


def test_machine_path_pattern():
    bad = ["see " + "/tm" + "p/x.jsonl", "PTQ_DATA=" + "/wo" + "rk/shared/data", "/ro" + "ot/.cache/ptq",
           "(" + "/ho" + "me/alice/repo)", "file://" + "/tm" + "p/a", "`/Us" + "ers/bob/x`", "into " + "/tm" + "p, then"]
    ok = ["~/.cache/ptq/smollm2-135m", "$PTQ_DATA/janeausten", "https://github.com" + "/wo" + "rk/t" + "mp/x", "../shared/data",
          "tmp_path / 'out'", "network/workers", "src" + "/ro" + "ot/x"]
    assert all(MACHINE_PATH.search(s) for s in bad), [s for s in bad if not MACHINE_PATH.search(s)]
    assert not any(MACHINE_PATH.search(s) for s in ok), [s for s in ok if MACHINE_PATH.search(s)]


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_machine_paths_in_tracked_files():
    hits = []
    files = _tracked_files()
    assert any(f.name == "README.md" for f in files)
    for f in files:
        if not f.is_file():
            continue
        data = f.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "absolute machine paths (use tmp_path, $PTQ_DATA or a relative path):\n" + "\n".join(hits)
