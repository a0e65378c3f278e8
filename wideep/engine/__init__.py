"""One engine rank (nano-vllm sized, vLLM v1 shaped).

api.py            the contract: SamplingParams, EngineRequest, RequestOutput, EngineStats, KV events
config.py         EngineArgs (vLLM knob names)
request.py        a request's engine-side state
block_hash.py     chained prefix-block hashes (the keys KV events carry)
block_manager.py  paged KV blocks, prefix cache, LRU eviction, KV events
scheduler.py      continuous batching, chunked prefill, preemption, P/D connector seam
sampler.py        batched device sampling (greedy, temperature, top-k/p, seeds, min_tokens)
kv_cache.py       cache sizing from the memory budget
model_runner.py   batch -> model inputs, CUDA graphs for decode, sampling
core.py           EngineCore: add_request / abort_request / step
proc.py           the engine process loop over ZMQ, StepCoordinator seam
lockstep.py       DP lockstep coordinator (all ranks of an EP group step together)
dp.py             DP x EP engine assembly: one engine process per rank, offline generate_dp
client.py         AsyncEngineClient + start_engine (the frontend's handle)
output_processor.py  detokenization and stop strings (shared with the HTTP frontend)
llm.py            offline LLM.generate;  cli.py: `wideep generate`
"""
