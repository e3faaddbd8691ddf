"""benchmarks/mutation.py's rewrite of decorated functions: same objects at run time, same line numbers."""

import glob
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from mutation import MODULES, undecorated  # noqa: E402

SOURCE = textwrap.dedent('''\
    import abc
    import contextlib
    import functools


    def twice(function):
        @functools.wraps(function)
        def wrapper(*args):
            return 2 * function(*args)
        return wrapper


    def scaled(factor):
        return lambda function: functools.wraps(function)(lambda *args: factor * function(*args))


    @contextlib.contextmanager
    def opened(log):
        log.append("enter")
        yield 3
        log.append("exit")


    @twice
    @scaled(
        3,
    )
    def square(x):
        return x * x


    @functools.lru_cache(maxsize=None)
    def cube(x):
        return x ** 3


    class Shape(abc.ABC):
        @property
        def size(self):
            return self._size

        @size.setter
        def size(self, value):
            self._size = value

        @abc.abstractmethod
        def area(self):
            ...

        @staticmethod
        def unit():
            return 1

        @twice
        def doubled(self):
            return self._size
        unit_size = 1
        @twice
        def packed(self):
            return 0
''')


def run(source):
    namespace = {}
    exec(compile(source, "<source>", "exec"), namespace)
    log = []
    with namespace["opened"](log) as value:
        pass

    class Box(namespace["Shape"]):
        def area(self):
            return 0

    box = Box()
    box.size = 5
    return value, log, namespace["square"](4), namespace["cube"](2), box.size, box.doubled(), box.packed(), Box.unit()


def test_the_rewrite_gives_the_same_objects_and_keeps_every_line():
    new, kept = undecorated(SOURCE)
    assert run(new) == run(SOURCE) == (3, ["enter", "exit"], 96, 8, 5, 10, 0, 1)
    old_lines, new_lines = SOURCE.splitlines(), new.splitlines()
    assert len(new_lines) == len(old_lines) + 1  # the last function's statement is appended
    assert "def opened(log):" in new_lines[old_lines.index("def opened(log):")]
    assert "opened = (contextlib.contextmanager)(opened)" in new_lines
    assert "square = (twice)((scaled(3))(square))" in new_lines
    assert "    size = (property)(size)" in new_lines and new_lines[-1] == "    packed = (twice)(packed)"
    assert not any(line.lstrip().startswith(("@contextlib", "@scaled", "@property")) for line in new_lines)
    # kept decorated: a setter (it needs the property by name), an abstract method, a cache (a forked mutant would
    # read the unmutated value cached before the fork), one with no blank line after it
    assert kept == ["area (@abc.abstractmethod)", "cube (@functools.lru_cache(maxsize=None))",
                    "doubled (no blank line after it)", "size (@size.setter)"]
    assert "    @staticmethod" in new_lines and "    @size.setter" in new_lines


def test_every_mutated_source_still_compiles_with_its_lines_in_place():
    for sources, _ in MODULES.values():
        for path in (Path(p) for pattern in sources for p in sorted(glob.glob(str(REPO / pattern)))):
            source = path.read_text()
            new, _ = undecorated(source)
            compile(new, str(path), "exec")
            old_lines, new_lines = source.splitlines(), new.splitlines()
            assert len(new_lines) in (len(old_lines), len(old_lines) + 1), path
            changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
            assert all(a.lstrip().startswith("@") or not a.strip() for a, _ in changed), (path, changed)
