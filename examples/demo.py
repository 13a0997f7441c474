"""The demo `make demo` runs: load an engine package in-process and stream an answer."""

import sys

import edge_sdk

model = edge_sdk.load(sys.argv[1])
print(f"model: {model.capabilities()}")
stream = model.stream("Where is the charging dock?", max_tokens=48, temperature=0.7, seed=0)
for delta in stream:
    print(delta.text, end="", flush=True)
r = stream.result
print(f"\n[{r.finish_reason}] {r.prompt_tokens} prompt + {r.completion_tokens} tokens, "
      f"first token {r.time_to_first_token_s * 1000:.1f} ms, {r.tokens_per_second:.0f} tok/s")
