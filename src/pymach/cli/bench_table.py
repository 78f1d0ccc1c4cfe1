"""How `pymach bench` prints its results without `--json`: readable tables.

The benchmarks return flat dictionaries of figures (bench/); the cache benchmark's
passes are dictionaries of their own, shown here as the table of the README's
"Benchmarks" section. Nothing is computed here beyond what the result holds.
"""

from __future__ import annotations

from typing import Any

_CACHE_ROWS = (("mapped", "mapped_pass1", 1), ("mapped", "mapped_pass2", 2),
               ("read calls", "read_calls_pass1", 1), ("read calls", "read_calls_pass2", 2))


def format_result(result: dict[str, Any]) -> str:
    """A benchmark's result as text: the cache table, or one aligned line per figure
    (a nested dictionary's figures as `key.field`)."""
    if result.get("benchmark") == "cache":
        return format_cache(result)
    flat = _flatten(result)
    width = max((len(k) for k in flat), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in flat.items())


def _flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def format_cache(r: dict[str, Any]) -> str:
    """The section 9 cache benchmark: each way and pass with its messages, I/O
    operations and time, then the totals and ratios it reports."""
    lines = [f"{r['files']} files of {r['file_size'] >> 10} KiB, each read twice "
             f"(paper, section 9)",
             f"{'way':<10}  {'pass':>4}  {'client msgs':>11}  {'pager msgs':>10}  "
             f"{'I/O ops':>7}  {'time':>10}"]
    for way, key, n in _CACHE_ROWS:
        p = r[key]
        lines.append(f"{way:<10}  {n:>4}  {p['client_messages']:>11}  "
                     f"{p['pager_messages']:>10}  {p['io_operations']:>7}  "
                     f"{p['ms']:>7.1f} ms")
    lines.append(f"I/O operations in both passes: mapped {r['io_operations_mapped_total']}, "
                 f"read calls {r['io_operations_read_calls_total']} "
                 f"({r['ratio_io_read_calls_vs_mapped']}x as many)")
    lines.append(f"second pass: read calls take {r['ratio_time_pass2_read_calls_vs_mapped']}x "
                 f"the time of mapped files")
    return "\n".join(lines)
