r"""data_prep: turn multimodal corpora into webdataset shards with a manifest (see docs/INTERFACES.md §1).

    python -m data_prep synth --output runs/demo/data --num-samples 4000 --seed 0
    python -m data_prep tokenizer --shards runs/demo/data/captions runs/demo/data/vqa --vocab-size 1000 \
        --output runs/demo/tokenizer
    python -m data_prep verify runs/demo/data/captions
    python -m data_prep pairs --input pairs.jsonl --image-root images/ --output out/pairs --workers 2
    python -m data_prep clotho --captions clotho_captions_evaluation.csv --audio-root evaluation --output out/clotho
"""
