# env.sh -- the environment a compress job needs on a compute node. Copy it next to your checkout,
# edit the paths, and name it on every launch:
#
#   python -m jobs.launch prune ... --partition gpu --gpus 1 --setup "source /shared/me/compress-env.sh"
#
# Its lines run in the batch script before Python starts (submitit's `setup`), and the sbatch
# template (prune.sbatch) sources it too. Every path must be the same on the login node and on
# every compute node (home, project or scratch space; not /tmp).

# 1. Site modules torch's CUDA build needs, if your site uses modules (or nothing at all).
# module load cuda/12.4

# 2. The project's virtualenv. submitit already starts the venv's own python by its absolute path
#    (the python you launched with), so activating is only needed for tools the job shells out to;
#    the venv must sit on the shared filesystem for that path to exist on the nodes.
# source /shared/me/cluster-compress/.venv/bin/activate

# 3. Data, starting weights and results. The launcher reads COMPRESS_DATA / COMPRESS_WEIGHTS when it
#    builds the spec on the login node, so the spec carries absolute paths; they are set here for
#    jobs started from sbatch directly. Relative --results paths resolve against the directory you
#    launched from (the job's working directory).
export COMPRESS_DATA=/shared/datasets/cifar10            # holds cifar-10-batches-bin/ or -py/
export COMPRESS_WEIGHTS=/shared/me/weights/resnet20-12fca82f.th

# 4. Threads: one per CPU of the job, not per core of the node (the job wrapper also sets torch's).
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
