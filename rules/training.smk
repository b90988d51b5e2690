# DINOv3-style self-supervised training from scratch, with checkpoints.


rule train_dino:
    input:
        tables=expand(f"{RESULTS}/stimuli/{{dataset}}.parquet", dataset=config["training"]["datasets"]),
    output:
        checkpoints=[
            f"{RESULTS}/training/{{model}}/checkpoint_it{it}.pt" for it in config["training"]["checkpoints"]
        ],
    log:
        f"{RESULTS}/logs/train_{{model}}.log",
    params:
        roots=training_roots,
        image_size=training_image_size,
        training=config["training"],
        seed=config["seed"],
    threads: 1
    resources:
        gpu=1,
    script:
        "../workflow/scripts/train_dino.py"
