"""Strict JSON output (issue 12, defect 8): non-finite floats become null; the text parses with a strict parser."""

import json
import math

from neuqi import jsonio


def test_non_finite_floats_become_null_at_any_depth():
    obj = {"ppl": math.nan, "rows": [{"loss": math.inf}, (1.5, -math.inf)], "name": "x", "n": 3, "ok": None}
    text = jsonio.dumps(obj, indent=1)
    strict = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
    assert strict == {"ppl": None, "rows": [{"loss": None}, [1.5, None]], "name": "x", "n": 3, "ok": None}
