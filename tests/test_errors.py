"""kiln.errors' shared checks."""

from __future__ import annotations

import pytest

from kiln.builder.options import BuildOptions
from kiln.converters.options import ConvertOptions
from kiln.engine import EngineError
from kiln.errors import ConfigError
from kiln.quantization.options import QuantizeOptions
from kiln.runtime.options import ExecutorOptions


@pytest.mark.parametrize("make,error,field", [
    (lambda **kw: ConvertOptions(**kw), ConfigError, "overwrite"),
    (lambda **kw: QuantizeOptions(qformat="int8_wo", **kw), ConfigError, "quantize_lm_head"),
    (lambda **kw: QuantizeOptions(qformat="int8_wo", **kw), ConfigError, "no_accuracy_gate"),
    (lambda **kw: BuildOptions("ckpt", "out", **kw), ConfigError, "overwrite"),
    (lambda **kw: BuildOptions("ckpt", "out", **kw), ConfigError, "gather_context_logits"),
    (lambda **kw: ExecutorOptions(**kw), EngineError, "cpu_spin_wait"),
    (lambda **kw: ExecutorOptions(**kw), EngineError, "verify_checksums"),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_a_flag_of_the_python_api_takes_true_or_false_only(make, error, field, value):
    """A trial's overwrite="no" had replaced an existing output, no_accuracy_gate="false"
    written a checkpoint past its gate and quantize_lm_head="false" quantized the head: a
    non-empty string is truthy. None is the default where the option has one (cpu_spin_wait)."""
    if value is None and field == "cpu_spin_wait":
        assert make(**{field: None}).cpu_spin_wait is None
        return
    with pytest.raises(error) as e:
        make(**{field: value})
    assert str(e.value) == f"{field} must be True or False, found {value!r}"
    assert getattr(make(**{field: True}), field) is True
