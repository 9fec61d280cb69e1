"""``hal backends``: every discovered backend, its status and why."""
from __future__ import annotations

import click

from hal.commands._common import emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--traceback", "show_tb", is_flag=True, help="Show the traceback of broken plugins.")
def backends(as_json: bool, show_tb: bool):
    """List every backend plugin found in the 'hal.backends' entry-point group.

    \b
    Status is one of:
      available     ops can run now (device and libraries found)
      unavailable   the backend's probe said no; the reason says why (no GPU, no CANN, ...)
      broken        the plugin raised while loading or probing (see --traceback)
      incompatible  the plugin implements another contract version
    For available backends the ops are listed by path: native (on the device's own units) and
    emulated (a declared substitute, e.g. FP8 via bf16 dequantization). HAL_BACKENDS=a,b limits
    which plugins are loaded. Exit code 0.
    """
    from hal.registry import get_registry
    out = []
    for rec in get_registry().records():
        d = rec.to_dict()
        if rec.status == "available":
            caps = rec.backend.capabilities()
            d["ops"] = {op: {"path": c.path, "dtypes": list(c.dtypes), "note": c.note,
                             "conditional": c.supports is not None} for op, c in caps.items()}
        else:
            d["ops"] = {}
        if not show_tb and not as_json:
            d.pop("traceback")
        out.append(d)
    if as_json:
        emit_json(out)
        return
    for d in out:
        click.echo(f"{d['name']:<10} {click.style(d['status'], fg={'available': 'green'}.get(d['status'], 'red'))}"
                   f"  {d['reason']}")
        if d.get("device"):
            click.echo(f"{'':<10} device: {d['device']}")
        if d.get("versions"):
            click.echo(f"{'':<10} versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()))
        if d["ops"]:
            for path in ("native", "emulated"):
                names = [op for op, c in d["ops"].items() if c["path"] == path]
                if names:
                    click.echo(f"{'':<10} {path}: " + ", ".join(names))
        if d.get("traceback"):
            click.echo(d["traceback"])
    if not out:
        click.echo("no backend plugins found (is hal installed? `pip install .`)")
