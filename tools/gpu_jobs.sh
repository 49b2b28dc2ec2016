#!/usr/bin/env bash
# The GPU work of one device session, as named jobs (the device tool runs one command line per call, ≤ 10 min).
# Run after `. tools/device_setup.sh`; every job writes its files under $OUT/<job>/ and prints its figures.
#   bash tools/gpu_jobs.sh tests|batch|tasks|methods|search|fidelity|mixed|pipeline|resume|workers|gen8b|genbackends|gqa|recipes|search16
set -u
job=$1
o=$OUT/$job
mkdir -p "$o"
case $job in
  tests)    # the suite's gpu-marked tests (skip without CUDA in CI)
    python3 -m pytest tests/test_gpu.py -q -m gpu -p no:cacheprovider 2>&1 | tee "$o/gpu-tests.txt" | tail -15 ;;
  batch)    # evaluation batch before/after on the bf16 baseline, all 1319 GSM8K test items
    python3 experiments/bench_gpu_batch.py --limit 1319 --models baseline --out "$o/gpu-batch.json" ;;
  tasks)    # task figures of the default model on the GPU (BBH all 27 tasks, HumanEval in the sandbox)
    python3 -m acf.cli.main eval --model smollm2-135m --dataset bbh --limit ${BBH_LIMIT:-20} --device cuda \
      --metrics accuracy,answer_nll --json "$o/eval-bbh.json" 2>&1 | tail -25
    python3 -m acf.cli.main eval --model smollm2-135m --dataset humaneval --limit 144 --device cuda \
      --metrics pass@1 --allow-code-execution --json "$o/eval-humaneval.json" 2>&1 | tail -25 ;;
  methods)  # every method of the benchmark table on the default model
    python3 experiments/bench_methods.py --device cuda --limit 100 --out "$o" 2>&1 | grep -v "^\[transformers\]" | tail -30 ;;
  search)   # the measured strategy table for the sampler replay
    python3 experiments/bench_search.py --measure --device cuda --table "$o/search-table-cuda.json" 2>&1 \
      | grep "^\[[0-9]*/\|strategies" ;;
  fidelity) # the fixed-recipe fidelity table (resumable across calls: rows already written are kept)
    timeout -s TERM ${BENCH_SECONDS:-540} python3 experiments/bench_fidelity.py --device cuda --limit 400 --acc-limit ${ACC_LIMIT:-1319} \
      --csqa-limit ${CSQA_LIMIT:-1221} --acc-batch ${ACC_BATCH:-1319} --out runs/bench-fidelity --resume 2>&1 | grep -v "^\[transformers\]" | tail -30
    cp runs/bench-fidelity/fidelity-cuda.* "$o/" ;;
  mixed)    # bench_mixed's compressed-tensors rows on the GPU (the GGUF rows need llama.cpp, which the GPU image lacks);
            # resumable across calls like fidelity
    timeout -s TERM ${BENCH_SECONDS:-540} python3 experiments/bench_mixed.py --device cuda --limit 400 --calib-samples 64 \
      --configs ${MIXED_CONFIGS:-gptq_w4g64,gptq_w4g64_ao,mixed_4.25_ao,mixed_4.5_ao,gptq_w4g32_ao,mixed_5.0_ao,mixed_6.0_ao,gptq_w8_ao,rtn_w4g64,rtn_mixed_4.25,mixed_4.25_ao+kd100,gptq_w4g64_ao+kd100,mixed_4.25_ao+kd100_norms,rtn_w4g64+kd100,mixed_4.25_ao+kd300} \
      --out runs/bench-mixed --resume 2>&1 | grep -v "^\[transformers\]" | tail -30
    cp runs/bench-mixed/mixed-cuda.* "$o/" ;;
  pipeline) # the 12-episode GSM8K run with the default objectives (kld,size,latency); killed at the call's limit
            # if need be, then `resume` finishes it. Search on 400 test items, the report on the other 919.
    timeout -s KILL ${PIPE_SECONDS:-540} python3 run_pipeline.py --model smollm2-135m --dataset gsm8k --episodes 12 \
      --limit 400 --proxy-limit 64 --final-limit 919 --final-metrics ${FINAL_METRICS:-answer_nll} --calib-samples 64 \
      --device cuda --run-dir runs/gpu12 2>&1 | tail -40
    python3 tools/copy_run.py runs/gpu12 runs/gpu12-copy >/dev/null && tar czf "$o/gpu12.tgz" -C runs gpu12-copy ;;
  resume)
    timeout -s KILL ${PIPE_SECONDS:-540} python3 run_pipeline.py --resume runs/gpu12 2>&1 | tail -40
    rm -rf runs/gpu12-copy; python3 tools/copy_run.py runs/gpu12 runs/gpu12-copy >/dev/null \
      && tar czf "$o/gpu12.tgz" -C runs gpu12-copy ;;
  workers)  # episodes per hour, 1 vs 2 workers (one per GPU) on one study
    python3 experiments/bench_workers.py --episodes ${EPISODES:-8} --device cuda --out runs/bench-workers \
      --json "$o/bench-workers.json" 2>&1 | grep -v "^\[transformers\]" | tail -30 ;;
  gen8b)    # #18: generation of the Llama-3.1-8B shape (random weights), 400 GSM8K prompts x 256 tokens: batch 32 and the
            # memory-sized batch with transformers' sdpa (repeat_kv, cuDNN allowed), then acf's engine (folded, no
            # cuDNN), each twice; ENGINES=continuous,static adds those engines
    python3 experiments/bench_scale.py --parts gen,tf --shape 8b --engines "${ENGINES:-}" \
      --data-dir "$ACF_DATA_DIR/gsm8k" --tag acf-8b-gen-gqa --out "$o" 2>&1 | grep -v "^\[transformers\]" | tail -30 ;;
  genbackends) # first vs second call per attention path and SDPA backend at 8B shape (TOKENIZER=<a tokenizer folder>
               # spares the default model, e.g. its tokenizer files carried in .gpu/tok)
    python3 experiments/bench_gen_backends.py --tokenizer "${TOKENIZER:-$(python3 -c 'from acf.models.loading import resolve_model; print(resolve_model("smollm2-135m"))')}" \
      --data-dir "$ACF_DATA_DIR/gsm8k" --out "$o" 2>&1 | grep -v "^\[transformers\]" | tail -10 ;;
  gqa)      # the same before/after on the default model (9 query heads over 3 KV heads)
    python3 experiments/bench_gqa.py --device cuda --prompts ${GQA_PROMPTS:-400} --batch ${GQA_BATCH:-400} --new 256 \
      2>&1 | tail -8; cp experiments/results/gqa-cuda.json "$o/" ;;
  recipes)  # #27: the yardstick (every fixed recipe), the calibration mix, acf's AutoRound allocations + kd_tune;
            # written into experiments/results after every row and resumable across calls (carry nothing: the partial
            # JSON travels with the working tree)
    timeout -s TERM ${BENCH_SECONDS:-540} python3 experiments/bench_recipes.py --device cuda --limit 400 \
      --calib-samples ${CALIB:-128} --configs ${RECIPE_CONFIGS:-all} --resume 2>&1 | grep -v "^\[transformers\]" | tail -40
    cp experiments/results/recipes-cuda.* "$o/" ;;
  search16) # #28: the 16-episode run with the new defaults (kld,size; continuous budget; screening; aim), the yardstick
            # measured first; killed at the call's limit, resumed by the next call on the same warm machine. The run
            # without its models comes back as gpu16.tgz after every call. 128 windows of 256 tokens: at 512 the
            # quarter of general text (16,384 tokens) is more than the shipped data holds (~10,800), so every
            # calibrated step failed (2026-12-08; now refused at the start, acf.methods.calibration.check_supply).
    if [ -f runs/gpu16/run_config.json ]; then
      timeout -s KILL ${PIPE_SECONDS:-540} python3 run_pipeline.py --resume runs/gpu16 2>&1 \
        | grep -v "^\[transformers\]\|it/s\]\|s/it\]" | tail -60
    else
      timeout -s KILL ${PIPE_SECONDS:-540} python3 run_pipeline.py --model smollm2-135m --dataset gsm8k --episodes 16 \
        --limit 200 --proxy-limit 48 --final-limit 400 --calib-samples 128 --seq-len 256 --device cuda \
        --run-dir runs/gpu16 2>&1 \
        | grep -v "^\[transformers\]\|it/s\]\|s/it\]" | tail -60
    fi
    rm -rf runs/gpu16-copy; python3 tools/copy_run.py runs/gpu16 runs/gpu16-copy >/dev/null \
      && tar czf "$o/gpu16.tgz" -C runs gpu16-copy ;;
  *) echo "unknown job $job"; exit 2 ;;
esac
