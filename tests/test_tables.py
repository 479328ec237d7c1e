"""The package's plain-text table."""

from gxpo.tables import format_table


def test_format_table_aligns_columns():
    rows = [
        {"benchmark": "math500", "pass@1": 0.41234, "n": 4},
        {"benchmark": "gsm8k", "pass@1": 0.5, "n": 16},
    ]
    assert format_table(rows, ["benchmark", "pass@1", "n", "maj@4"]).splitlines() == [
        "benchmark  pass@1   n  maj@4",
        "---------  ------  --  -----",
        "math500    0.4123   4  -",
        "gsm8k      0.5000  16  -",
    ]
