# python scripts/train_evaluator.py: writes checkpoints/evaluator (about 30 s on 2 cores)
"""Train the cascade benchmark's independent evaluator: the classifier family at another width, seed and
length, so class accuracy of delivered images is not graded by the judge itself."""
import json
from pathlib import Path

import torch

from families.checkpoint import load_model, save_json
from families.data import load_split
from families.train import train

out = Path("checkpoints/evaluator")
card = train("classifier", steps=1500, seed=1, out_dir=out, run_dir=Path("/tmp/evaluator-run"),
             overrides={"width": 16, "features": 128}, progress=False)
model, card = load_model("classifier", out)
test = load_split("test")
with torch.no_grad():
    preds = torch.cat([model(torch.from_numpy(test.images[i:i + 1000].copy()).unsqueeze(1)).argmax(1)
                       for i in range(0, len(test.images), 1000)]).numpy()
card["metrics"] = {"test_accuracy": round(float((preds == test.labels).mean()), 4)}
card["purpose"] = ("benchmarks/policy.py --cascade grades delivered images' class accuracy with this, not with "
                   "the judge (checkpoints/classifier): another seed (1), width (16) and length (1500 steps)")
save_json(out / "card.json", card)
print(json.dumps(card["metrics"]), card["train_seconds"])
