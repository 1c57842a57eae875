"""The Multimodal Pathway on any `nn.Module`: attach, train, fold.

The pathway lives in the weight itself: `torch.nn.utils.parametrize` makes `module.weight` return
`W + λ·W_aux`, so code that reads the weight directly (VideoMAE's `F.linear(x, self.qkv.weight, ...)`, HF
`Conv1D`) sees the pathway exactly like `module(x)` does, and the forward is one matmul on the merged weight.

State-dict keys follow a fixed, M2PT-compatible convention, for each pathway module at path `P`:
`P.weight` (the original W), `P.bias` (if any), `P.aux_weight`, `P.cross_modal_scale` (shape [1]). Hooks on
the module translate to and from parametrize's internal names (`P.parametrizations.weight.original`, ...), so a
paired checkpoint file and `model.state_dict()` are interchangeable and both load with `strict=True`.

The package is split by job: `parametrization` (the `Pathway` parametrization), `state_names` (the public
state-dict names and the per-module class that copies and pickles), `attach` (`attach`, `fold`,
`pathway_modules`), `optim` (`param_groups`, `scales`) and `sharding` (the tensors under FSDP2). Import the API
from here.
"""

from mmsurgery.paired_format import split_paired
from mmsurgery.pathway.attach import attach, fold, is_attached, pathway_modules
from mmsurgery.pathway.optim import param_groups, scales
from mmsurgery.pathway.parametrization import Pathway
from mmsurgery.pathway.state_names import (  # private: only for pickles, see below
    _load_post_hook,
    _load_pre_hook,
    _rebuild_parametrized,
    _state_dict_post_hook,
)

__all__ = [
    "Pathway",
    "attach",
    "fold",
    "is_attached",
    "param_groups",
    "pathway_modules",
    "scales",
    "split_paired",
]

# `torch.save(model)` of an attached model pickles these by module and name: the module rebuilder
# (`__reduce_ex__` → `_rebuild_parametrized`), the three state-dict hooks each pathway module holds, and the
# `Pathway` class. Pickles written before this package was split (one module, `mmsurgery/pathway.py`) name them
# `mmsurgery.pathway.<name>`; they stay importable here under those exact names, and new pickles name them here
# too (pickle checks the name leads back to the same object), so a later move of a submodule breaks no pickle.
for _pickled in (Pathway, _rebuild_parametrized, _state_dict_post_hook, _load_pre_hook, _load_post_hook):
    _pickled.__module__ = __name__
del _pickled
