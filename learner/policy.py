"""The learner's model: one base model in memory, with adapters switched on and off.

- `default`: the trainable LoRA, the candidate being trained (PEFT saves the adapter named
  `default` at the top of a directory, which is the layout the service loads).
- `vN`: frozen copies of versions from the adapter store, loaded on demand: the behaviour
  policy of a GRPO group, the parent a gate compares against. A few stay loaded.
- `base`: every adapter disabled, the reference of DPO and of GRPO's KL term.
"""

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from strop.adapters import AdapterStore
from strop.versions import BASE

log = logging.getLogger("strop.learner.policy")

TRAIN = "default"


class Policy:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        store: AdapterStore,
        lora: LoraConfig,
        keep_frozen: int = 3,
    ):
        self.tokenizer, self.store, self.lora = tokenizer, store, lora
        self.keep_frozen = keep_frozen
        self.model: PeftModel = get_peft_model(model, lora, adapter_name=TRAIN)
        self.parent = BASE  # the version the trainable adapter started from
        self.frozen: OrderedDict[str, None] = OrderedDict()  # loaded vN, oldest first

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self, parent: str, seed: int = 0) -> None:
        """Start the trainable adapter afresh from `parent`: its weights (a version in the
        store) or, for `base`, a new LoRA."""
        base = self.model.unload()  # drop every adapter; the base weights are untouched
        self.frozen.clear()
        if parent == BASE:
            torch.manual_seed(seed)
            self.model = get_peft_model(base, self.lora, adapter_name=TRAIN)
        else:
            self.model = PeftModel.from_pretrained(
                base, self.store.path(parent), adapter_name=TRAIN, is_trainable=True
            )
        self.model.to(self.device)
        self.parent = parent
        log.info("trainable adapter starts from %s", parent)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory), selected_adapters=[TRAIN])

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[PeftModel]:
        """Run the model as `name`: `default` (the candidate), `base`, or a version `vN`."""
        if name == TRAIN:
            yield self.model
        elif name == BASE:
            with self.model.disable_adapter():
                yield self.model
        else:
            self._load_frozen(name)
            self.model.set_adapter(name, inference_mode=True)
            try:
                yield self.model
            finally:
                # back to the candidate; this also makes its weights trainable again
                self.model.set_adapter(TRAIN)

    def _load_frozen(self, version: str) -> None:
        if version in self.frozen:
            self.frozen.move_to_end(version)
            return
        path = self.store.path(version)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"version {version} is not in {self.store.root}")
        self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
        self.model.set_adapter(TRAIN)  # loading must not change which adapter trains
        self.frozen[version] = None
        while len(self.frozen) > self.keep_frozen:
            old, _ = self.frozen.popitem(last=False)
            self.model.delete_adapter(old)
