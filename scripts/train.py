"""Run the GPO recipe directly under accelerate, without the `gpo-trl` wrapper:

    accelerate launch scripts/train.py --config configs/demo.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config configs/demo.yaml --use_cpu true
"""

from gpo_trl.recipe import run

if __name__ == "__main__":
    run()
