"""The Hugging Face Hub: pull (branch, tag, commit, offline from the cache, a folder of a repo), push with a model card, base add hub:.

    python examples/04_hub.py [WORKDIR]

The demo cannot reach huggingface.co, so it starts the same local Hub the tests use (tests/hubserver.py: a real
HTTP server on 127.0.0.1 speaking the Hub API) and points HF_ENDPOINT at it. loraops talks to it through the real
huggingface_hub client, exactly as it would to the Hub.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _build import loraops, workdir, llama, peft_lora  # noqa: E402
from hubserver import FakeHub  # noqa: E402


def main() -> None:
    work = workdir("04_hub")
    os.environ["HF_HOME"] = str(work / "hf-home")
    print(f"building a base and two adapter versions in {work} ...")
    base = llama(work / "llama-tiny")
    v1 = peft_lora(base, work / "anime-v1", r=8, alpha=16, targets=["q_proj", "v_proj"], seed=1)
    v2 = peft_lora(base, work / "anime-v2", r=8, alpha=16, targets=["q_proj", "v_proj"], seed=2)

    with FakeHub(work / "hub-store", tokens={"hf_demo_token": "me"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        print(f"local Hub at {hub.url}")
        # Someone publishes an adapter: v1, tagged, then v2 on main; and a base model.
        hub.commit_folder("someone/anime-lora", v1, message="v1")
        hub.tag("someone/anime-lora", "v1.0")
        hub.commit_folder("someone/anime-lora", v2, message="v2")
        hub.commit_folder("someone/llama-tiny", base, message="weights")

        loraops("base", "add", "hub:someone/llama-tiny", "--name", "llama-tiny")  # headers only
        loraops("pull", "someone/anime-lora@v1.0", "--name", "anime", "--base", "llama-tiny")
        loraops("pull", "someone/anime-lora", "--name", "anime", "--base", "llama-tiny")  # a newer commit: version 2
        loraops("pull", "someone/anime-lora", "--name", "anime")  # the same commit again: nothing changes
        offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
        loraops("pull", "someone/anime-lora@v1.0", "--name", "anime", env=offline)  # from the cache
        loraops("list")
        loraops("show", "anime@1")
        loraops("check", "anime", "--base", "llama-tiny")
        # Merging into a Hub base downloads its weights (once, into the Hub cache) when first needed.
        loraops("merge", "anime", "--into", "llama-tiny", "-o", work / "llama-anime")

        # A derived adapter goes up with its lineage in the model card.
        loraops("combine", "anime@1:0.5", "anime@2:0.5", "--method", "cat", "--name", "anime-blend")
        os.environ["HF_TOKEN"] = "hf_demo_token"
        loraops("push", "anime-blend", "me/anime-blend")
        print("\n--- README.md of me/anime-blend as the Hub stores it ---")
        print(hub.files("me/anime-blend")["README.md"].decode())
        # A repo of several adapters in folders: each pulled with --file is an adapter of its own, named after the
        # repo and its folder (not two versions of one)
        for seed, style in enumerate(("ink", "neon"), start=3):
            adapter = peft_lora(base, work / style, r=4, alpha=8, targets=["q_proj"], seed=seed)
            hub.commit_folder("someone/styles", adapter, prefix=f"loras/{style}/", message=style)
        loraops("pull", "someone/styles", ok=False)  # which one? the message lists them
        loraops("pull", "someone/styles", "--file", "loras/ink")
        loraops("pull", "someone/styles", "--file", "loras/neon")
        loraops("pull", "someone/does-not-exist", ok=False)
        loraops("pull", "someone/anime-lora@no-such-branch", ok=False)


if __name__ == "__main__":
    main()
