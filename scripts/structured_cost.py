"""What structured output costs a token: llguidance's mask per token, against the model's own time per
token, on a model's answers to a JSON schema and to "any JSON object" (README, "Serving").

    python scripts/structured_cost.py [MODEL] [TOKENS]
"""

import json
import sys
import time

import localmix
from localmix.generate import responses
from localmix.structured import Constraint, Vocabulary, json_grammar

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}

model_name = sys.argv[1] if len(sys.argv) > 1 else "demo"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 200
model = localmix.load(model_name)
start = time.perf_counter()
vocabulary = Vocabulary(model.tokenizer, model.config.vocab_size)
print(f"{model_name}: vocabulary of {model.config.vocab_size} read in {time.perf_counter() - start:.2f} s")
ids, _ = model.encode_prompt([{"role": "user", "content": "Describe a person as JSON."}])
for what, schema in (("schema", SCHEMA), ("json_object", None)):
    constraint = Constraint(vocabulary, json_grammar(schema))
    generation = model.start(ids, tokens, localmix.SamplingParams(temperature=0.8, seed=3), new_text=True,
                             constraint=constraint)
    start = time.perf_counter()
    answer = list(responses(generation))
    seconds = time.perf_counter() - start
    text = "".join(r.text for r in answer)
    print(f"{what}: {constraint.masks} tokens, mask {constraint.mask_seconds / constraint.masks * 1e6:.0f} us a token, "
          f"whole token {seconds / constraint.masks * 1e3:.2f} ms; ends {answer[-1].finish_reason}; "
          f"{json.dumps(text[:80])}")
