"""Run by tests/vlm/test_ddp.py as its own process: LLaVA-KD on 2 CPU processes (Lightning's ``ddp`` launcher starts
rank 1 by running this file again), each rank writing what it sees to ``<folder>/rank<r>.json``.

Lightning 2.6 refuses ``strategy: fsdp`` without a GPU (``_AcceleratorConnector`` raises "The strategy `fsdp`
requires a GPU accelerator"), so the processes run ``ddp`` (gloo); the teacher's FSDP wrap (``shard_teacher``) is
PyTorch's own and runs on CPU.
"""

import json
import sys
from pathlib import Path

import lightning as L


class Inspect(L.Callback):
    """Writes what each process sees after a training step."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, *args):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        wrapped = trainer.strategy.model
        full = getattr(pl_module, "_teacher_numel", 0)
        facts = {
            "world": trainer.world_size,
            "ddp": isinstance(wrapped, DistributedDataParallel),
            "teacher_fsdp": isinstance(pl_module.teacher, FullyShardedDataParallel),
            "teacher_in_ddp": any("teacher" in n for n, _ in wrapped.named_parameters()),
            "teacher_local": sum(p.numel() for p in pl_module.teacher.parameters()),
            "teacher_full": full,
            "loss_terms": sorted(k for k in trainer.logged_metrics if k.startswith("train/loss_")),
        }
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))


def main(folder: str) -> None:
    from zoo.data.vqa import DigitsVQADataModule
    from zoo.methods.llava_kd import LLaVAKD
    from zoo.models.vlm import LlavaModel

    L.seed_everything(0)
    vision = {"library": "timm", "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32,
              "depth": 1, "num_heads": 2}
    lm = {"model_type": "qwen2", "vocab_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "num_key_value_heads": 1, "max_position_embeddings": 64, "eos_token_id": 2, "bos_token_id": 1}
    student = LlavaModel(vision, {**lm, "hidden_size": 32, "num_hidden_layers": 2}, select_layer=-1)
    teacher = LlavaModel(vision, {**lm, "hidden_size": 48, "num_hidden_layers": 2}, select_layer=-1)
    method = LLaVAKD(student, teacher, in_chans=1, shard_teacher=True)
    method._teacher_numel = sum(p.numel() for p in method.teacher.parameters())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Inspect(folder)],
                        default_root_dir=folder)
    trainer.fit(method, datamodule=DigitsVQADataModule(train_samples=20, num_test=16, batch_size=4))


if __name__ == "__main__":
    main(sys.argv[1])
