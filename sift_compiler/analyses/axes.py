"""Axis expressions and their union-find: the algebra behind channel coupling.

Every axis of every tensor in the graph gets an expression over *symbols*:

- ``Sym(i)``: an atomic size (a Linear's out features, a parameter's axis, a view's new axis);
- ``Const(n)``: a size that never changes (batch, spatial, sequence, a literal split count);
- ``Sum(a, b, ...)``: a concatenation (``torch.cat``), or what a ``split`` cut apart;
- ``Prod(a, b, ...)``: a merge of axes (``flatten``, ``view(B, L, H * D)``);
- ``FloorDiv(a, n)``: a size computed by the model's code, ``C // n_head`` (sizes computed with
  ``*`` and ``+`` are a Prod or Sum with Const parts: ``3 * C``, ``C + 1``).

`AxisGraph.unify(a, b)` records that two axes must have the same size. Symbols that must be
equal are merged (union-find); a symbol that must equal a composite gets it as its *definition*;
a symbol that must equal a constant is *pinned*. Solving then gives every free symbol its widened
size and evaluates everything else from it, so any two axes the graph couples stay equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union


@dataclass(frozen=True)
class Sym:
    id: int


@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Sum:
    terms: Tuple["Expr", ...]


@dataclass(frozen=True)
class Prod:
    factors: Tuple["Expr", ...]


@dataclass(frozen=True)
class FloorDiv:
    numerator: "Expr"
    divisor: int


Expr = Union[Sym, Const, Sum, Prod, FloorDiv]


def symbols(expr: Expr) -> Iterator[Sym]:
    """Every Sym inside ``expr``."""
    if isinstance(expr, Sym):
        yield expr
    elif isinstance(expr, (Sum, Prod, FloorDiv)):
        for part in _parts(expr):
            yield from symbols(part)


class AxisGraph:
    """Union-find over axis symbols with sizes, pins, rounding multiples and definitions."""

    def __init__(self) -> None:
        self._parent: List[int] = []
        self.size: List[int] = []          # original size of each symbol
        self.label: List[str] = []         # where the symbol was created (for reports)
        self.pinned: Dict[int, str] = {}   # root -> why it keeps its size
        self.asked: set = set()            # pinned roots the user asked to keep
        self.multiple: Dict[int, int] = {}  # root -> the new size must be a multiple of this
        self.derived_multiple: List[Tuple[Expr, int]] = []  # composite axes (a cat's Sum) that must be too
        self.definition: Dict[int, Expr] = {}  # root -> composite it equals
        self.varying: List[int] = []       # symbols that follow the input's shape (batch, sequence, spatial)

    # -- symbols -------------------------------------------------------------------------
    def new(self, size: int, label: str, pinned: Optional[str] = None) -> Expr:
        """A fresh axis: Const for sizes 0/1 and pinned axes, else a Sym."""
        if size <= 1 or pinned:
            if size <= 1:
                return Const(int(size))
            sym = self._make(size, label)
            self.pinned[sym.id] = pinned
            return sym
        return self._make(size, label)

    def _make(self, size: int, label: str) -> Sym:
        self._parent.append(len(self._parent))
        self.size.append(int(size))
        self.label.append(label)
        return Sym(len(self._parent) - 1)

    def find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:
            self._parent[i], i = root, self._parent[i]
        return root

    def mark_varying(self, expr: Expr) -> None:
        self.varying.extend(s.id for s in symbols(expr))

    def varies(self, exprs) -> bool:
        """Does any of ``exprs`` depend on a size that follows the model's input shape?"""
        varying = {self.find(i) for i in self.varying}
        return any(root in varying for expr in exprs for root in self.reach(expr))

    def root(self, sym: Sym) -> int:
        return self.find(sym.id)

    def roots(self) -> List[int]:
        return sorted({self.find(i) for i in range(len(self._parent))})

    # -- constraints ---------------------------------------------------------------------
    def pin(self, expr: Expr, reason: str, asked: bool = False) -> None:
        """Keep every symbol of ``expr`` at its original size. ``asked``: because the user asked
        for it (attention_width="keep"), which is then the reason shown, whatever else pinned it."""
        for sym in symbols(expr):
            root = self.root(sym)
            if asked and root not in self.asked:
                self.pinned[root] = reason
                self.asked.add(root)
            else:
                self.pinned.setdefault(root, reason)

    def require_multiple(self, expr: Expr, multiple: int) -> None:
        if multiple > 1 and isinstance(expr, Sym):
            root = self.root(expr)
            self.multiple[root] = math.lcm(self.multiple.get(root, 1), multiple)
        elif multiple > 1 and isinstance(expr, (Sum, Prod, FloorDiv)):
            # a GroupNorm after a UNet's skip concatenation: checked once the parts have sizes
            self.derived_multiple.append((expr, multiple))

    def unify(self, a: Expr, b: Expr, where: str) -> None:
        """Record that axes ``a`` and ``b`` must always have the same size."""
        work = [(a, b)]
        while work:
            x, y = work.pop()
            if isinstance(x, Sym) and isinstance(y, Sym):
                self._union(x, y, work)
            elif isinstance(y, Sym):
                self._bind(y, x, where, work)
            elif isinstance(x, Sym):
                self._bind(x, y, where, work)
            elif isinstance(x, Const) or isinstance(y, Const):
                self.pin(x, f"equals a fixed size at {where}")
                self.pin(y, f"equals a fixed size at {where}")
            elif type(x) is type(y) and len(_parts(x)) == len(_parts(y)) and \
                    getattr(x, "divisor", None) == getattr(y, "divisor", None):
                work.extend(zip(_parts(x), _parts(y)))
            else:  # two different compositions of the same size: keep all of them as they are
                self.pin(x, f"composed two ways at {where}")
                self.pin(y, f"composed two ways at {where}")

    def _union(self, x: Sym, y: Sym, work) -> None:
        rx, ry = self.root(x), self.root(y)
        if rx == ry:
            return
        self._parent[ry] = rx
        if ry in self.pinned:
            reason = self.pinned.pop(ry)
            if ry in self.asked and rx not in self.asked:
                self.pinned[rx] = reason
                self.asked.add(rx)
            else:
                self.pinned.setdefault(rx, reason)
        if ry in self.multiple:
            self.multiple[rx] = math.lcm(self.multiple.get(rx, 1), self.multiple.pop(ry))
        if ry in self.definition:
            other = self.definition.pop(ry)
            if rx in self.definition:
                work.append((self.definition[rx], other))
            else:
                self.definition[rx] = other
        if rx in self.definition and rx in self.reach(self.definition[rx]):  # x = f(y) and now x = y
            self.pin(self.definition.pop(rx), "defined in terms of itself")
            self.pinned.setdefault(rx, "defined in terms of itself")

    def _bind(self, sym: Sym, expr: Expr, where: str, work) -> None:
        root = self.root(sym)
        if isinstance(expr, Const):
            self.pinned.setdefault(root, f"equals the fixed size {expr.value} at {where}")
        elif root in self.reach(expr):
            self.pin(expr, f"defined in terms of itself at {where}")
            self.pinned.setdefault(root, f"defined in terms of itself at {where}")
        elif root in self.definition:
            work.append((self.definition[root], expr))
        else:
            self.definition[root] = expr

    def reach(self, expr: Expr) -> set:
        """The roots ``expr`` depends on, following definitions."""
        seen: set = set()
        stack = [self.root(s) for s in symbols(expr)]
        while stack:
            root = stack.pop()
            if root not in seen:
                seen.add(root)
                if root in self.definition:
                    stack.extend(self.root(s) for s in symbols(self.definition[root]))
        return seen

    def fixed(self, expr: Expr) -> bool:
        """True when no part of ``expr`` can change size: every root it depends on is pinned, or
        defined by pinned roots."""
        seen: set = set()
        stack = [self.root(s) for s in symbols(expr)]
        while stack:
            root = stack.pop()
            if root in seen or root in self.pinned:
                continue
            seen.add(root)
            if root not in self.definition:
                return False
            stack.extend(self.root(s) for s in symbols(self.definition[root]))
        return True

    def propagate_pins(self) -> bool:
        """A pinned root pins every part of its definition; True if anything changed."""
        changed = False
        for root, expr in list(self.definition.items()):
            if root in self.pinned and any(self.root(s) not in self.pinned for s in symbols(expr)):
                self.pin(expr, self.pinned[root])
                changed = True
        return changed

    # -- solving -------------------------------------------------------------------------
    def original(self, expr: Expr) -> int:
        return self._evaluate(expr, lambda root: self.size[root])

    def solve(self, widen: Callable[[int, int, int], int]) -> Callable[[Expr], int]:
        """Sizes after widening: ``widen(root, original size, multiple)`` decides each free root.

        Pins propagate into definitions first (a pinned composite pins its parts), and a derived
        size that breaks its multiple pins its parts, until nothing changes.
        """
        pushed = set()
        while True:
            changed = self.propagate_pins()
            sizes: Dict[int, int] = {}

            def decide(root: int) -> int:
                if root not in sizes:
                    if root in self.definition:
                        sizes[root] = self._evaluate(self.definition[root], decide)
                    elif root in self.pinned:
                        sizes[root] = self.size[root]
                    else:
                        sizes[root] = widen(root, self.size[root], self.multiple.get(root, 1))
                return sizes[root]
            for root in self.roots():
                decide(root)
            checks = [(sizes[root], expr, self.multiple.get(root, 1), root)
                      for root, expr in self.definition.items() if root not in self.pinned]
            checks += [(self._evaluate(expr, decide), expr, multiple, expr)
                       for expr, multiple in self.derived_multiple]
            for size, expr, multiple, key in checks:
                if size % multiple == 0:
                    continue
                terms = [t for t in (expr.terms if isinstance(expr, Sum) else ()) if isinstance(t, Sym)]
                if terms and (key, multiple) not in pushed:
                    # a concatenation stays a multiple when each of its parts is one
                    pushed.add((key, multiple))
                    for term in terms:
                        self.require_multiple(term, multiple)
                else:
                    self.pin(expr, "a derived size must stay a multiple")
                    if isinstance(key, int):
                        self.pinned[key] = "a derived size must stay a multiple"
                changed = True
            if not changed:
                return lambda expr: self._evaluate(expr, decide)

    def _evaluate(self, expr: Expr, size_of_root: Callable[[int], int]) -> int:
        if isinstance(expr, Const):
            return expr.value
        if isinstance(expr, Sym):
            return size_of_root(self.root(expr))
        if isinstance(expr, FloorDiv):
            return self._evaluate(expr.numerator, size_of_root) // expr.divisor
        values = [self._evaluate(p, size_of_root) for p in _parts(expr)]
        return sum(values) if isinstance(expr, Sum) else math.prod(values)


def _parts(expr: Expr) -> Tuple[Expr, ...]:
    if isinstance(expr, FloorDiv):
        return (expr.numerator,)
    return expr.terms if isinstance(expr, Sum) else expr.factors

