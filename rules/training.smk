# DINOv3-style self-supervised training from scratch, one job per checkpoint interval (resumable).


rule pretraining_table:
    output:
        table=f"{RESULTS}/training/pretraining.parquet",
    log:
        f"{RESULTS}/logs/pretraining_table.log",
    params:
        root=config["data"]["pretraining_images"],
        image_list=config["data"]["pretraining_list"],
    script:
        "../workflow/scripts/pretraining_table.py"


rule train_dino_init:
    output:
        checkpoint=f"{RESULTS}/training/{{model}}/checkpoint_it0.pt",
    log:
        f"{RESULTS}/logs/train_{{model}}_it0.log",
    params:
        training=training_section,
        seed=config["seed"],
    script:
        "../workflow/scripts/train_dino_init.py"


rule train_dino_segment:
    input:
        previous=previous_training_checkpoint,
        tables=training_tables,
    output:
        checkpoint=f"{RESULTS}/training/{{model}}/checkpoint_it{{iteration}}.pt",
        log=f"{RESULTS}/training/{{model}}/log_it{{iteration}}.parquet",
    log:
        f"{RESULTS}/logs/train_{{model}}_it{{iteration}}.log",
    wildcard_constraints:
        iteration=r"[1-9]\d*",
    params:
        roots=training_roots,
        training=training_section,
        until=training_segment_end,
    threads: 8
    resources:
        gpu=1,
    script:
        "../workflow/scripts/train_dino_segment.py"
