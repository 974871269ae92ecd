"""Device resolution without a profile (`distill data --correct-teacher` on its own): no --device
is the CPU as before; `auto` takes the first accelerator this process finds."""

from __future__ import annotations

import pytest

from edgepack.distill.device import resolve_device


@pytest.mark.parametrize(("requested", "available", "expected"), [
    (None, ["cpu", "cuda"], "cpu"),  # no --device: the CPU, whatever is installed
    ("auto", ["cpu", "cuda", "mps"], "cuda"),
    ("auto", ["cpu", "mps"], "mps"),
    ("auto", ["cpu"], "cpu"),
    ("cpu", ["cpu", "cuda"], "cpu"),
])
def test_without_a_profile_auto_is_the_first_accelerator_found(requested: str | None, available: list[str],
                                                               expected: str) -> None:
    device = resolve_device(requested, None, available=available, cuda_bf16=True)
    assert device.name == expected
    if requested == "auto":
        assert device.reason.startswith("auto: no profile") and device.reason.endswith(expected)
    if requested is None:
        assert device.reason == "no profile, default cpu"


def test_with_a_profile_auto_still_follows_the_profile() -> None:
    assert resolve_device("auto", "cpu", available=["cpu", "cuda"]).name == "cpu"
    assert resolve_device("auto", "cuda", available=["cpu", "cuda"], cuda_bf16=True).name == "cuda"


def test_without_a_profile_an_absent_device_is_still_refused() -> None:
    from edgepack.errors import UsageError

    with pytest.raises(UsageError, match="--device cuda is not available"):
        resolve_device("cuda", None, available=["cpu"])
