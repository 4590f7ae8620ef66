"""transformers.Trainer on a tiny Llama with rotary installed: train, checkpoint, resume; one process and torchrun.

Each run is a subprocess (Trainer and torch.distributed keep process-wide state) with a timeout against hangs.
Every run ends deterministically: the ranks meet at a barrier once all their work is written, then each destroys
its process group. A process that exits with its gloo group alive can abort in interpreter finalization (gloo's
worker threads release tensors and take the GIL while Python is being torn down, pytorch/pytorch#179291): a
timing-dependent SIGABRT that torchrun reports as a non-zero exit, so the test could fail once in a while. Ports
are no issue: ``--standalone`` binds its store on a port the OS picks and shares it with the workers. Each run
writes its own output directory, so the resumed run never writes where the first one did.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch, transformers
    import rotary.integrations.hf

    out, mode = sys.argv[1], sys.argv[2]  # mode: "straight" (4 steps) or "resume" (from its checkpoint-2 to 4)
    rank = int(os.environ.get("RANK", 0))
    transformers.set_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=97, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0,
    )
    model = rotary.hf.install(transformers.LlamaForCausalLM(config), per_layer=True)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 97, (32, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, mode), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=0.05, use_cpu=True, report_to=[], logging_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,  # one process: no process group at all
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    if mode == "resume":
        trainer.train(resume_from_checkpoint=os.path.join(out, "straight", "checkpoint-2"))
    else:
        trainer.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out, f"{mode}-rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has written everything: none exits while another still works
        torch.distributed.destroy_process_group()  # before the interpreter's teardown, not during it
    """
)


def _run(tmp_path, mode, processes):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if processes == 1:
        command = [sys.executable, str(script), str(tmp_path), mode]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--standalone", str(script), str(tmp_path), mode]
    # its own session, so that a timeout ends torchrun's workers too, not only torchrun
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)  # about 15 s per run on 2 busy cores: a hang, not load
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    # torchrun's report names the failing rank and its exit code (a signal is negative)
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return [torch.load(tmp_path / f"{mode}-rank{r}.pt") for r in range(processes)]


@pytest.mark.parametrize("processes", [1, 2])
def test_trainer_trains_checkpoints_and_resumes(tmp_path, processes):
    straight = _run(tmp_path, "straight", processes)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["rotary_install"]["per_layer"] is True
    resumed = _run(tmp_path, "resume", processes)
    angles = [k for k in straight[0] if k.endswith("rotary.mixer.angles")]
    assert len(angles) == 2 and all(straight[0][k].abs().max() > 0 for k in angles)  # the rotary trained
    for states in (straight, resumed):
        for state in states[1:]:  # every rank holds the same parameters
            assert all(torch.equal(state[k], states[0][k]) for k in states[0])
    for k in straight[0]:  # resuming from step 2 lands where training straight through does
        torch.testing.assert_close(resumed[0][k], straight[0][k], rtol=1e-5, atol=1e-6)
