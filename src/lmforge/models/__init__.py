"""Models: the families lmforge builds (`families`), building and loading them (`build`), and the architectures
of its own — the ELECTRA generator + discriminator, the experts' ensemble, DEMix and mixture-of-experts models —
plus the lean GPT-2 forward pass (`lean`). Models know no objective and no training loop."""

from lmforge.models.build import (auto_class, build_model, check_compatible, count_parameters, family_of,
                                  flops_per_token, frozen_body_parameters, load_model, max_block_size)
from lmforge.models.families import PRESETS, dimensions, make_config
from lmforge.paths import local_path, package_path

__all__ = ["PRESETS", "auto_class", "build_model", "check_compatible", "count_parameters", "dimensions", "family_of",
           "flops_per_token", "frozen_body_parameters", "load_model", "local_path", "make_config", "max_block_size",
           "package_path"]
