"""Write src/factlab/builtin/replay.txt: general English text for `replay: {source: general}`.

Why generated: replay should remind the model of what it could do before fine-tuning, and the
closest thing to "what it could do" is its own output. The text is SmolLM2-135M-Instruct's own
answers (the embedded model, sampled with a fixed seed) to short requests on everyday topics,
so mixing it into a stage's data pulls the model back towards its original distribution
(self-synthesized rehearsal) without downloading anything. It is the model's own text, not
a source of facts: a 135M model's answers are fluent and often wrong, and that is what replay
should preserve (its English), not what anyone should learn from. It is not the perplexity text
(builtin/general.txt, written by hand): damage is measured on text replay never trained on.

Run once: `.venv/bin/python tools/make_replay_text.py` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from rich.progress import Progress

from factlab.models.loading import load_model, resolve_model

TOPICS = """how bread rises; why the sky is blue; how a bicycle stays upright; the water cycle;
how to care for a houseplant; the history of the printing press; how vaccines work; what a
volcano is; how bees make honey; the rules of chess; how to write a good letter; why we sleep;
how a refrigerator keeps food cold; the planets of the solar system; how to start running;
the life of a butterfly; what causes thunder; how money is printed; the history of the
Olympic Games; how a camera takes a picture; why leaves change colour in autumn; the Great
Wall of China; how to make a cup of tea; what an earthquake is; how birds migrate; the
invention of the telephone; how to save money; the human heart; how trains work; the moon's
phases; why the ocean is salty; how to plant a tree; the history of paper; how computers
store data; what a rainbow is; how to learn a new language; the Amazon rainforest; how
glass is made; what causes the seasons; how to cook rice; the Roman Empire; how airplanes
fly; the importance of recycling; how the brain learns; what a desert is; how electricity
reaches a home; the history of the bicycle; how to be a good friend; the life of a honeybee
colony; what clouds are made of; how wind turbines work; the pyramids of Egypt; how to
prepare for a job interview; what photosynthesis is; how soap cleans; the history of maps;
how a library is organised; why we have tides; how to bake cookies; the first steps on the
moon; how a river forms; how to take care of a dog; what DNA is; the history of music
notation; how a lighthouse works; what a glacier is; how to stay safe in a storm; the
invention of the wheel; how muscles grow; what an island is; how coffee is grown; the
Silk Road; how to organise a small garden; what gravity does; how a compass works; the
history of the post office; how to read a map; what a coral reef is; how paint is made;
why exercise is healthy; the story of the light bulb; how fish breathe; what a museum does;
how to write a short story; the history of the calendar; how snow forms; how elections
work; what a forest gives us; how to fix a flat tyre; the history of tea; how a bridge
carries weight; what a star is; how to keep a diary; the life of a farmer; how wool becomes
cloth; what an ecosystem is; how to plan a trip; the history of writing; how clocks keep
time; what a hurricane is; how cheese is made; the importance of clean water; how a
newspaper is made; what a habit is; how to learn to swim; the history of the piano; how
ants live together; what the internet is; how to cook an omelette; the Industrial
Revolution; how mountains form; what a good breakfast looks like; how to care for your
teeth; the history of football; how salt is made; what a city needs; how a seed grows""".replace("\n", " ")

STYLES = [
    "Write a short paragraph about {t}.",
    "Explain {t} to a curious twelve-year-old.",
    "Tell me some interesting facts about {t}.",
]


def main(out: Path = Path(__file__).resolve().parent.parent / "src/factlab/builtin/replay.txt",
         seed: int = 0, batch: int = 24, max_new_tokens: int = 200) -> None:
    torch.manual_seed(seed)
    topics = [t.strip() for t in TOPICS.split(";") if t.strip()]
    prompts = [s.format(t=t) for t in topics for s in STYLES]
    random.Random(seed).shuffle(prompts)
    model, tok = load_model(resolve_model("smollm2-135m"))
    model.eval()
    tok.padding_side = "left"
    texts: list[str] = []
    with Progress() as bar, torch.inference_mode():
        task = bar.add_task("generating", total=len(prompts))
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in chunk]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = tok.decode(row, skip_special_tokens=True).strip()
                # keep whole sentences only: a sample cut by the token budget ends mid-sentence
                cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind(".") if text.endswith(".") else -1)
                if cut > 200:
                    texts.append(text[:cut + 1])
            bar.advance(task, len(chunk))
    header = ("# General English for replay, generated by SmolLM2-135M-Instruct (tools/make_replay_text.py, "
              f"seed {seed}); one document per paragraph block, separated by blank lines.\n\n")
    out.write_text(header + "\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n", encoding="utf-8")
    print(f"{len(texts)} documents, {sum(len(t.split()) for t in texts)} words -> {out}")


if __name__ == "__main__":
    main()
