"""The quantization methods: one module per family, each registering its quantizers in
:data:`dqt.quant.base.QUANTIZERS` when imported (importing this package registers them all).

Every quantizer class nests a ``Config`` dataclass: its arguments, their defaults and
documentation, and their checks (``__post_init__``, ``check_kind``).
"""

from dqt.quant.methods import (admm, alternating, balanced, binary, dorefa,  # noqa: F401
                               ebp, factorized, fixed_point, flexpoint, hashing, hwgq, inq,
                               integer, learned, log_quant, minifloat, product, shiftcnn, slq,
                               tanh_quant, ternary, tnn, wage, weight_sharing)
