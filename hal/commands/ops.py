"""``hal ops``: the operator contract."""
from __future__ import annotations

import click

from hal.commands._common import emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the contract as JSON.")
@click.option("--doc", "op_doc", metavar="OP", help="Print one op's full docstring.")
def ops(as_json: bool, op_doc: str | None):
    """List the contract's ops: family, signature and one-line semantics.

    Use --doc OP for an op's full documentation (shapes, dtypes, semantics, errors). The same text
    is the docstring of hal.ops.<op> and of every runtime's bound op.
    """
    from hal.contract import CONTRACT, CONTRACT_VERSION
    if op_doc:
        spec = CONTRACT.get(op_doc)
        if spec is None:
            raise click.BadParameter(f"unknown op {op_doc!r}; known: {', '.join(CONTRACT)}", param_hint="--doc")
        if as_json:
            emit_json({"op": spec.name, "signature": spec.signature_str(), "doc": spec.doc})
        else:
            click.echo(spec.signature_str() + "\n\n" + spec.doc)
        return
    rows = [{"op": s.name, "family": s.family, "signature": s.signature_str(), "summary": s.summary,
             "outputs": {k: v.kind for k, v in s.outputs.items()}} for s in CONTRACT.values()]
    if as_json:
        emit_json({"contract_version": CONTRACT_VERSION, "ops": rows})
        return
    click.echo(f"HAL contract {CONTRACT_VERSION}: {len(rows)} ops")
    family = None
    for r in rows:
        if r["family"] != family:
            family = r["family"]
            click.echo(f"\n[{family}]")
        click.echo(f"  {r['signature']}\n      {r['summary']}")
