"""The exceptions HAL raises. Both are part of the public API (`hal.ContractError`, ...)."""
from __future__ import annotations


class ContractError(ValueError):
    """A contract op received an argument the contract (docs/contract.md) rules out.

    The message always names the op, the argument, what was expected and what came, e.g.
    ``moe_route: router_logits: expected a 2-D tensor [T, E], got shape (4,)``.
    """

    def __init__(self, op: str, arg: str, expected: str, got: object):
        self.op, self.arg, self.expected, self.got = op, arg, expected, got
        super().__init__(f"{op}: {arg}: expected {expected}, got {got}")


class BackendUnavailable(RuntimeError):
    """A backend that was named explicitly cannot be used; the message says why.

    Raised for backends that are unknown, broken (their plugin failed to load), incompatible
    (another contract version) or unavailable (the probe said no: no device, no driver, ...).
    HAL never silently falls back to the CPU when a backend was named.
    """

    def __init__(self, backend: str, status: str, reason: str):
        self.backend, self.status, self.reason = backend, status, reason
        super().__init__(f"backend {backend!r} is {status}: {reason}")


class UnsupportedCase(RuntimeError):
    """A backend was asked to run an op on arguments its capability table rules out and the
    runtime's fallback policy is ``"error"``."""

    def __init__(self, op: str, backend: str, reason: str):
        self.op, self.backend, self.reason = op, backend, reason
        super().__init__(f"{op}: backend {backend!r} does not support this call: {reason}")


class KernelOutputError(RuntimeError):
    """A backend kernel returned outputs the contract rules out (checked mode compares every
    output's shape and dtype with the op's ``meta``). Names the op, the backend, the output,
    what was expected and what came."""

    def __init__(self, op: str, backend: str, output: str, expected: object, got: object):
        self.op, self.backend, self.output, self.expected, self.got = op, backend, output, expected, got
        super().__init__(f"{op}: backend {backend!r} returned {output}: expected {expected}, got {got}")
