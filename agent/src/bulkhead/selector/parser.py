"""Recursive-descent parser for Calico's selector language.

Grammar (precedence: `!` binds tightest, then `&&`, then `||`):

    selector   := <empty> | or_expr
    or_expr    := and_expr ("||" and_expr)*
    and_expr   := unary ("&&" unary)*
    unary      := "!" unary | "(" or_expr ")" | "all()" | "global()" | "has(" KEY ")"
                | KEY ("==" | "!=") STRING
                | KEY ("in" | "not in") "{" [STRING ("," STRING)*] "}"
                | KEY ("contains" | "starts with" | "ends with") STRING
    (`startswith`, `endswith` and `notin` are accepted, as Calico does; `!!x` is `x`)
    Tokens are separated by spaces and tabs only, as in Calico's tokenizer, and `has(`,
    `all(` and `global(` are written without a space before the parenthesis.
    KEY        := [a-zA-Z0-9_./-]+
    STRING     := '"' [^"]* '"' | "'" [^']* "'"
"""

from __future__ import annotations

import re

from bulkhead.selector.ast import All, BoolOp, Compare, Global, Has, InSet, Node, Not

MAX_DEPTH = 64  # nesting of (), ! and has(); keeps recursion and compiled code bounded

_KEY = re.compile(r"[a-zA-Z0-9_./\-]+")
_WORD_OPS = (  # Calico allows any spacing between the words, none included
    ("starts with", re.compile(r"starts[ \t]*with(?![a-zA-Z0-9_./\-])")),
    ("ends with", re.compile(r"ends[ \t]*with(?![a-zA-Z0-9_./\-])")),
    ("contains", re.compile(r"contains(?![a-zA-Z0-9_./\-])")),
    ("not in", re.compile(r"not[ \t]*in(?![a-zA-Z0-9_./\-])")),
    ("in", re.compile(r"in(?![a-zA-Z0-9_./\-])")),
)
MAX_KEY_LENGTH = 512
_CALL = re.compile(r"(all|global|has)\(")
SPACE = " \t"  # Calico's tokenizer skips these and nothing else


class SelectorError(ValueError):
    """A selector that does not parse; says where and what was expected."""

    def __init__(self, text: str, position: int, expected: str) -> None:
        self.text = text
        self.position = position
        self.expected = expected
        found = repr(text[position:position + 12]) if position < len(text) else "end of selector"
        super().__init__(
            f"selector {text!r}: at position {position}: expected {expected}, found {found}"
        )


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    # -- scanning ---------------------------------------------------------------------
    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in SPACE:
            self.pos += 1

    def peek(self, literal: str) -> bool:
        self.skip_space()
        return self.text.startswith(literal, self.pos)

    def take(self, literal: str) -> bool:
        if self.peek(literal):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str, what: str | None = None) -> None:
        if not self.take(literal):
            raise self.error(what or repr(literal))

    def error(self, expected: str) -> SelectorError:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos].isspace():
            expected += " (only spaces and tabs may separate tokens, as in Calico)"
        return SelectorError(self.text, self.pos, expected)

    def key(self) -> str:
        self.skip_space()
        m = _KEY.match(self.text, self.pos)
        if not m:
            raise self.error("a label key")
        if len(m.group()) > MAX_KEY_LENGTH:
            raise self.error(f"a label key of at most {MAX_KEY_LENGTH} characters")
        self.pos = m.end()
        return m.group()

    def string(self) -> str:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            q = self.text[self.pos]
            end = self.text.find(q, self.pos + 1)
            if end < 0:
                raise SelectorError(self.text, len(self.text), f"closing {q}")
            value = self.text[self.pos + 1:end]
            self.pos = end + 1
            return value
        raise self.error("a quoted string")

    # -- grammar ----------------------------------------------------------------------
    def parse(self) -> Node:
        self.skip_space()
        if self.pos == len(self.text):
            return All()
        node = self.or_expr()
        self.skip_space()
        if self.pos != len(self.text):
            raise self.error("'&&', '||' or end of selector")
        return node

    def or_expr(self) -> Node:
        operands = [self.and_expr()]
        while self.take("||"):
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else BoolOp("||", tuple(operands))

    def and_expr(self) -> Node:
        operands = [self.unary()]
        while self.take("&&"):
            operands.append(self.unary())
        return operands[0] if len(operands) == 1 else BoolOp("&&", tuple(operands))

    def unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"at most {MAX_DEPTH} levels of nesting")
        try:
            return self._unary()
        finally:
            self.depth -= 1

    def _unary(self) -> Node:
        if self.take("!"):
            # Calico folds a run of `!` by parity: `!!x` is `x`.
            negate = True
            while self.take("!"):
                negate = not negate
            operand = self.unary()
            return Not(operand) if negate else operand
        if self.take("("):
            node = self.or_expr()
            self.expect(")", "')'")
            return node
        self.skip_space()
        call = _CALL.match(self.text, self.pos)
        if call:
            self.pos = call.end()
            name = call.group(1)
            if name == "has":
                key = self.key()
                self.expect(")", "')' after the label key")
                return Has(key)
            self.expect(")", f"')' after {name}(")
            return All() if name == "all" else Global()
        if self.pos >= len(self.text) or not _KEY.match(self.text, self.pos):
            raise self.error("a label key, '!', '(', 'has(', 'all()' or 'global()'")
        key = self.key()
        return self.operation(key)

    def operation(self, key: str) -> Node:
        if self.take("=="):
            return Compare(key, "==", self.string())
        if self.take("!="):
            return Compare(key, "!=", self.string())
        self.skip_space()
        for op, pattern in _WORD_OPS:
            m = pattern.match(self.text, self.pos)
            if not m:
                continue
            self.pos = m.end()
            if op in ("in", "not in"):
                return InSet(key, self.string_set(), negated=(op == "not in"))
            return Compare(key, op, self.string())
        raise self.error(
            "an operator after the label key ('==', '!=', 'in', 'not in', 'contains', "
            "'starts with', 'ends with')"
        )

    def string_set(self) -> tuple[str, ...]:
        self.expect("{", "'{'")
        values: set[str] = set()
        if not self.take("}"):
            values.add(self.string())
            while self.take(","):
                if self.peek("}"):  # a trailing comma, as Calico accepts
                    break
                values.add(self.string())
            self.expect("}", "',' or '}'")
        return tuple(sorted(values))


def parse_tree(text: str) -> Node:
    """Parse selector text into a tree; raise SelectorError if it does not parse."""
    if not isinstance(text, str):
        raise SelectorError(repr(text), 0, "selector text (a string)")
    return _Parser(text).parse()
