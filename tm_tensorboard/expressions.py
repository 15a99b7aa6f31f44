"""Transformation sets and feature actions spelled as in Python (``"product(rotations(8), flips())"``,
``"cyclic_shift(4)"``), for the command line: parsed with ``ast`` and built by calling our own
constructors on literal arguments, never ``eval``."""
from __future__ import annotations

import ast
from typing import Any, Callable

from . import actions, transforms
from .transforms import TransformationSet

__all__ = ["parse_transformations", "parse_action", "parse_actions"]

TRANSFORMATIONS: dict[str, Callable[..., TransformationSet]] = {
    "rotations": transforms.rotations,
    "rot90": transforms.rot90,
    "translations": transforms.translations,
    "scalings": transforms.scalings,
    "flips": transforms.flips,
    "brightness": transforms.brightness,
    "contrast": transforms.contrast,
    "product": transforms.product,
}
COMBINATORS = {"product"}
ACTIONS: dict[str, Callable[..., actions.FeatureAction]] = {
    "identity": actions.identity,
    "orientation_pooling": actions.orientation_pooling,
    "cyclic_shift": actions.cyclic_shift,
    "patch_grid": actions.patch_grid,
}
_TRANSFORMATION_HELP = (
    'e.g. "rotations(16)", "rotations([-30, 0, 30])", "rot90()", "translations(0.1)", "scalings([0.8, 1.2])", '
    '"flips()", "brightness([-0.1, 0.1])", "contrast([0.5, 2])", "product(rotations(8), flips())"'
)
_ACTION_HELP = 'e.g. "identity()", "orientation_pooling(4)", "cyclic_shift(4)", "patch_grid(7, 7, cls_tokens=1)"'


def _literal(node: ast.AST, text: str) -> Any:
    """A number, string, bool, None, or a list / tuple of those (negative numbers included)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(item, text) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    raise ValueError(f"in {text!r}: {ast.unparse(node)!r} is not a number, string or list of numbers")


def _call(node: ast.AST, text: str, constructors: dict[str, Callable], what: str, help_text: str) -> Any:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"{text!r} is not a {what}; write it as a call, {help_text}")
    name = node.func.id
    if name not in constructors:
        raise ValueError(f"{name!r} in {text!r} is not one of ours ({', '.join(constructors)}); {help_text}")
    if name in COMBINATORS:  # product(...) takes sets, everything else literals
        args = [_call(a, text, constructors, what, help_text) for a in node.args]
    else:
        args = [_literal(a, text) for a in node.args]
    kwargs = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError(f"in {text!r}: ** arguments are not supported")
        kwargs[keyword.arg] = _literal(keyword.value, text)
    try:
        return constructors[name](*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"in {text!r}: {name}(): {error}") from error


def _expression(text: str, what: str) -> ast.AST:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"give a {what} as text, got {text!r}")
    try:
        return ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"{text!r} is not a valid {what} expression: {error.msg}") from error


def parse_transformations(text: str) -> TransformationSet:
    """The transformation set ``text`` spells, e.g. ``"product(rotations(8), flips())"``."""
    return _call(_expression(text, "transformation set"), text, TRANSFORMATIONS, "transformation set", _TRANSFORMATION_HELP)


def parse_action(text: str) -> actions.FeatureAction:
    """The feature action ``text`` spells, e.g. ``"cyclic_shift(4)"``."""
    return _call(_expression(text, "feature action"), text, ACTIONS, "feature action", _ACTION_HELP)


def parse_actions(items: list[str]) -> actions.FeatureAction | dict[str, actions.FeatureAction] | None:
    """``["cyclic_shift(4)"]`` (one action for every layer) or ``["features.*=cyclic_shift(4)", ...]``
    (``{layer pattern: action}``), as ``measure(actions=...)`` takes them."""
    if not items:
        return None
    mapping: dict[str, actions.FeatureAction] = {}
    for item in items:
        pattern, equals, action = item.partition("=")
        if not equals:
            if len(items) > 1:
                raise ValueError(f"with several actions, write each as PATTERN=ACTION; got {item!r}")
            return parse_action(item)
        if not pattern.strip():
            raise ValueError(f"{item!r}: the layer pattern before '=' is empty")
        mapping[pattern.strip()] = parse_action(action)
    return mapping
