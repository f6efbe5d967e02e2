"""OpCounter: which cnnops:: and torchvision:: ops ran inside a block, and how often.

It counts at the dispatcher, below autograd, so the backward pass's ops count too; the tests use
it to show that a patched or swapped model really ran cnnops' kernels and not torchvision's.
"""

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """`counts`: {"namespace::op": calls} of the cnnops:: and torchvision:: ops run inside it."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("cnnops", "torchvision"):
            key = f"{func.namespace}::{func._opname}"
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def names(self):
        return set(self.counts)

    def namespaces(self):
        return {key.split("::")[0] for key in self.counts}
