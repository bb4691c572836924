"""A VLM method on 2 CPU processes: the student is DDP-wrapped, the teacher sharded (FSDP) and outside it.

Lightning 2.6 refuses ``strategy: fsdp`` without a GPU (``_AcceleratorConnector`` raises "The strategy `fsdp`
requires a GPU accelerator"), so this CPU test uses ``ddp_fork`` (gloo); the teacher's FSDP wrap
(``shard_teacher``) is PyTorch's own and runs on CPU.
"""

import json
from pathlib import Path

import lightning as L


class Inspect(L.Callback):
    """Writes what each process sees after a training step (module level, so that ddp_spawn could pickle it too)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, *args):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        wrapped = trainer.strategy.model
        facts = {
            "world": trainer.world_size,
            "ddp": isinstance(wrapped, DistributedDataParallel),
            "teacher_fsdp": isinstance(pl_module.teacher, FullyShardedDataParallel),
            "teacher_in_ddp": any("teacher" in n for n, _ in wrapped.named_parameters()),
            "teacher_local": sum(p.numel() for p in pl_module.teacher.parameters()),
            "loss_terms": sorted(k for k in trainer.logged_metrics if k.startswith("train/loss_")),
        }
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))


def test_llava_kd_under_ddp_with_a_sharded_teacher(tmp_path):
    from zoo.data.vqa import DigitsVQADataModule
    from zoo.methods.llava_kd import LLaVAKD
    from zoo.models.vlm import LlavaModel

    vision = {"library": "timm", "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32,
              "depth": 1, "num_heads": 2}
    lm = {"model_type": "qwen2", "vocab_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "num_key_value_heads": 1, "max_position_embeddings": 64, "eos_token_id": 2, "bos_token_id": 1}
    student = LlavaModel(vision, {**lm, "hidden_size": 32, "num_hidden_layers": 2}, select_layer=-1)
    teacher = LlavaModel(vision, {**lm, "hidden_size": 48, "num_hidden_layers": 2}, select_layer=-1)
    method = LLaVAKD(student, teacher, in_chans=1, shard_teacher=True)
    full = sum(p.numel() for p in method.teacher.parameters())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Inspect(str(tmp_path))],
                        default_root_dir=tmp_path)
    trainer.fit(method, datamodule=DigitsVQADataModule(train_samples=20, num_test=16, batch_size=4))
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert f["world"] == 2 and f["ddp"] and f["teacher_fsdp"] and not f["teacher_in_ddp"]
        assert f["loss_terms"] == ["train/loss_reg", "train/loss_rel", "train/loss_res", "train/loss_vis"]
        assert 0 < f["teacher_local"] < full  # each process holds a shard of the teacher
    assert sum(f["teacher_local"] for f in facts) == full
