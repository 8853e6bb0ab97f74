"""The house's rules (docs/architecture.md): each package imports only packages below it, no two
import each other, and no private name crosses a package boundary. Read from the source with ast,
so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"
# Bottom to top; the modules at the top level of bridge/ (app, cli, workers, ...) are the face.
LAYERS = ["lmtp", "base", "ops", "mail", "webhook", "delivery", "server", "config"]
FACE = len(LAYERS)


def _room(module: str) -> str | None:
    """bridge.mail.parsed -> "mail"; bridge.app -> "app"; bridge -> None (the version)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _rank(room: str) -> int:
    return LAYERS.index(room) if room in LAYERS else FACE


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported module, imported names) for every bridge import."""
    found = []
    for path in sorted(BRIDGE.rglob("*.py")):
        module = ".".join(path.relative_to(BRIDGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "bridge" or node.module.startswith("bridge."):
                    found.append((module, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("bridge."):
                        found.append((module, alias.name, []))
    return found


def _edges() -> set[tuple[str, str]]:
    edges = set()
    for module, target, names in _imports():
        mine = _room(module)
        if target == "bridge":  # `from bridge import x`: x is a room (or the version)
            rooms = [n for n in names if n != "__version__"]
        else:
            rooms = [t for t in [_room(target)] if t]
        edges.update((mine, room) for room in rooms if mine and room != mine)
    return edges


def test_the_rooms_exist() -> None:
    assert {p.name for p in BRIDGE.iterdir() if (p / "__init__.py").exists()} == set(LAYERS)


@pytest.mark.parametrize("room", LAYERS)
def test_each_room_says_its_rules(room: str) -> None:
    doc = ast.get_docstring(ast.parse((BRIDGE / room / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"bridge/{room}/__init__.py: no rules"


def test_imports_run_down_the_flow() -> None:
    upward = sorted(
        f"{a} imports {b}" for a, b in _edges() if _rank(b) >= _rank(a) and _rank(a) < FACE
    )
    assert upward == []


def test_no_two_modules_import_each_other() -> None:
    pairs = {(_room(m) and m, t) for m, t, _ in _imports()}
    circles = sorted(f"{a} <-> {b}" for a, b in pairs if (b, a) in pairs and a < b)
    assert circles == []


def test_no_private_name_crosses_a_package() -> None:
    crossing = sorted(
        f"{module} imports {target}.{name}"
        for module, target, names in _imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and _room(module) != _room(target)
    )
    assert crossing == []


def test_the_face_is_small() -> None:
    face = [p.stem for p in BRIDGE.glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert len(face) <= 8, face
