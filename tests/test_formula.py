"""Tests for symbp.spec.formula: safe parsing of user formula strings."""

import re
import time

import pytest
import sympy

from symbp.spec.formula import DEFAULT_FUNCTIONS, FormulaError, parse_formula

z, y, t = sympy.symbols("z y t")
Z = {"z": z}
YT = {"y": y, "t": t}


def act(text, functions=None):
    return parse_formula(text, Z, functions, what="custom activation")


@pytest.mark.parametrize(("text", "variables", "expected"), [
    ("z*tanh(log(1 + exp(z)))", Z, z * sympy.tanh(sympy.log(sympy.exp(z) + 1))),
    ("(y - t)**2", YT, (y - t) ** 2),
    ("log(cosh(y - t))", YT, sympy.log(sympy.cosh(y - t))),
    ("z / (1 + abs(z))", Z, z / (1 + sympy.Abs(z))),
    ("-z + +z - -z", Z, z),
    ("max(z, 0) + min(z, 0, 1)", Z, sympy.Max(z, 0) + sympy.Min(z, 0, 1)),
    ("sqrt(z) * sign(z) * erf(z)", Z, sympy.sqrt(z) * sympy.sign(z) * sympy.erf(z)),
    ("sin(z) + cos(z) + tan(z) + atan(z) + asinh(z) + sinh(z)", Z,
     sympy.sin(z) + sympy.cos(z) + sympy.tan(z) + sympy.atan(z) + sympy.asinh(z) + sympy.sinh(z)),
    ("log1p(z)", Z, sympy.log(1 + z)),
    ("log(z, 2)", Z, sympy.log(z, 2)),
    ("pow(z, 3)", Z, z**3),
    ("z/2/3", Z, z / 6),
    ("2**-1 * z", Z, z / 2),
    ("  z * (\n 1 + z)\n", Z, z * (1 + z)),
    ("+".join(["z"] * 900), Z, 900 * z),  # long flat sums are not "deep"
])
def test_valid_formulas_match_sympy(text, variables, expected):
    result = parse_formula(text, variables)
    assert result == expected
    assert sympy.simplify(result - expected) == 0


def test_result_is_a_normal_evaluated_expression():
    assert str(act("z*tanh(log(1+exp(z)))")) == "z*tanh(log(exp(z) + 1))"


@pytest.mark.parametrize(("text", "expected"), [
    ("z^2", z**2),
    ("z^2 + 1", z**2 + 1),   # ^ binds like **, not like Python's low-precedence XOR
    ("-z^2", -(z**2)),
    ("2^3^2", sympy.Integer(512)),  # right-associative, like **
    ("2*z^3/3", 2 * z**3 / 3),
])
def test_caret_is_power(text, expected):
    assert act(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("0.01", sympy.Rational(1, 100)),
    ("0.1", sympy.Rational(1, 10)),
    ("1e-3", sympy.Rational(1, 1000)),
    ("2.5e2", sympy.Integer(250)),
    (".5", sympy.Rational(1, 2)),
    ("1_000.5", sympy.Rational(2001, 2)),
    ("0x10", sympy.Integer(16)),
    ("1e-400", sympy.Rational(1, 10**400)),  # below double range, still exact
    ("12345678901234567890123", sympy.Integer(12345678901234567890123)),
])
def test_numeric_literals_are_exact(text, expected):
    result = act(text)
    assert result == expected
    assert isinstance(result, sympy.Rational)


def test_exact_coefficients_in_formula():
    assert act("0.01*z + 0.3") == z / 100 + sympy.Rational(3, 10)


def test_constants():
    assert act("pi*z") == sympy.pi * z
    assert act("e**z") == sympy.exp(z)
    assert act("e^z") == sympy.exp(z)


def test_variables_shadow_constants():
    e = sympy.Symbol("e")
    assert parse_formula("e*pi", {"e": e}) == e * sympy.pi


def test_constant_formula_is_allowed():
    assert act("2*pi") == 2 * sympy.pi
    assert parse_formula("1", {}) == 1


def test_custom_functions_are_used():
    def sigmoid(x):
        return 1 / (1 + sympy.exp(-x))

    softplus = sympy.Function("softplus")
    result = act("z*sigmoid(z) + softplus(z)", {"sigmoid": sigmoid, "softplus": softplus})
    assert result == z / (1 + sympy.exp(-z)) + softplus(z)


def test_custom_functions_override_defaults_and_are_arity_checked():
    assert act("exp(z)", {"exp": lambda x: x + 1}) == z + 1
    with pytest.raises(ValueError, match=re.escape("sigmoid() takes 1 argument, got 2")):
        act("sigmoid(z, z)", {"sigmoid": lambda x: x})


def test_custom_function_must_return_sympy():
    with pytest.raises(TypeError, match="not a SymPy expression"):
        act("bad(z)", {"bad": lambda x: "oops"})


def test_default_function_table_is_read_only():
    with pytest.raises(TypeError):
        DEFAULT_FUNCTIONS["evil"] = print  # type: ignore[index]


@pytest.mark.parametrize(("text", "message"), [
    ("z.real", "unsupported syntax: attribute access"),
    ("z[0]", "unsupported syntax: subscripts"),
    ("lambda: z", "unsupported syntax: lambda"),
    ("[z for z in ()]", "unsupported syntax: comprehensions"),
    ("(z for z in ())", "unsupported syntax: comprehensions"),
    ("exp(x=z)", "unsupported syntax: keyword arguments"),
    ("exp(*z)", "unsupported syntax: starred arguments"),
    ("z < 1", "unsupported syntax: comparisons"),
    ("z and 1", "unsupported syntax: boolean operators"),
    ("'z'", "unsupported syntax: string literals"),
    ("b'z'", "unsupported syntax: bytes literals"),
    ("f'{z}'", "unsupported syntax: f-strings"),
    ("(w := z)", "unsupported syntax: assignment expressions"),
    ("z if z else 1", "unsupported syntax: conditional expressions"),
    ("(z, z)", "unsupported syntax: tuples"),
    ("{z: 1}", "unsupported syntax: dicts"),
    ("True", "unsupported syntax: booleans"),
    ("None", "unsupported syntax: None"),
    ("1j*z", "unsupported syntax: complex numbers"),
    ("exp(z)(1)", "unsupported syntax: calling something other than a function name"),
    ("z % 2", "unsupported syntax: operator '%'"),
    ("z // 2", "unsupported syntax: operator '//'"),
    ("~z", "unsupported syntax: operator '~'"),
    ("not z", "unsupported syntax: operator 'not'"),
    ("z*foo(z)", "unknown function 'foo' (known: abs, asinh, atan, cos, cosh, "),
    ("z + x", "unknown symbol 'x'; the formula may only use z"),
    ("__import__('os')", "unknown function '__import__'"),
    ("exp(z, z)", "exp() takes 1 argument, got 2"),
    ("max(z)", "max() takes at least 2 arguments, got 1"),
    ("log(z, 2, 3)", "log() takes 1 to 2 arguments, got 3"),
    ("exp + z", "'exp' is a function; call it as exp(...)"),
    ("z(1)", "'z' is not a function"),
    ("1/0", "is undefined"),
    ("log(0)", "is undefined"),
    ("z +", "does not parse: invalid syntax at the end"),
    ("(z^2))", "does not parse: unmatched ')' at column 6"),
    ("z\n+ 1", "does not parse: invalid syntax at line 2, column 1"),
])
def test_rejections_name_problem_and_quote_text(text, message):
    with pytest.raises(FormulaError, match=re.escape(message)) as info:
        act(text)
    assert str(info.value).startswith(f'custom activation "{text.strip()}"')
    assert isinstance(info.value, ValueError)


def test_unknown_symbol_lists_all_variables():
    with pytest.raises(ValueError, match="unknown symbol 'z'; the formula may only use t, y"):
        parse_formula("y - z", YT, what="custom loss")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text):
    with pytest.raises(ValueError, match="is empty"):
        act(text)


@pytest.mark.parametrize("value", [None, 1.5, b"z", sympy.Symbol("z")])
def test_non_string_is_type_error(value):
    with pytest.raises(TypeError, match="must be a string"):
        act(value)


def test_payloads_are_rejected_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"exp(__import__('os').system('touch {marker}'))",
        "().__class__.__bases__",
        "().__class__.__bases__[0].__subclasses__()",
        f"[c for c in ().__class__.__base__.__subclasses__()]('touch {marker}')",
        f"open('{marker}', 'w')",
        "globals()",
    ]
    for payload in payloads:
        with pytest.raises(ValueError):
            act(payload)
    assert not marker.exists()


@pytest.mark.parametrize(("text", "message"), [
    ("2**10**10", "exponent 10000000000 is not allowed"),
    ("10^10^10", "exponent 10000000000 is not allowed"),
    ("z**10**10", "exponent 10000000000 is not allowed"),
    ("pow(2, 10**10)", "exponent 10000000000 is not allowed"),
    ("2**(pi*1000)", "is not allowed"),
    ("(10**1000)**1000", "would produce a number of about"),
    ("sqrt(10**1000)**1000", "would produce a number of about"),
    ("1e99999", "numeric literal 1e99999 is out of range"),
    ("sqrt(" + "*".join(["(9**999)**3"] * 150) + ")", "produces a number of about"),
])
def test_huge_numbers_are_rejected_fast(text, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)):
        act(text)
    assert time.perf_counter() - start < 2.0


def test_moderate_powers_still_work():
    assert act("z**1000") == z**1000
    assert act("2**100") == 2**100
    assert act("sqrt(2)**4") == 4


def test_too_long():
    with pytest.raises(ValueError, match="is too long"):
        act("z+" * 1500 + "z")


@pytest.mark.parametrize("text", [
    "-" * 150 + "z",
    "exp(" * 150 + "z" + ")" * 150,
    "z**" * 150 + "z",
])
def test_too_deep(text):
    with pytest.raises(ValueError, match="nesting is deeper than 100 levels"):
        act(text)


def test_too_many_parentheses_does_not_crash():
    with pytest.raises(ValueError, match="does not parse"):
        act("(" * 300 + "z" + ")" * 300)


def test_long_message_text_is_clipped():
    text = "z + " * 100 + "x"
    with pytest.raises(ValueError) as info:
        act(text)
    assert "..." in str(info.value)
    assert len(str(info.value)) < 200
