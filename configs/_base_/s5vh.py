# Hyper-parameters common to every S5VH config (docs/method.md §4-§8). Per-dataset files inherit
# this one and set only what differs. Every key a child or --cfg-options may set is defined here.

dataset = "ucf"            # feature folder: <data_root>/<dataset>/
data_root = "data"
work_dir = "work_dirs"     # runs go to <work_dir>/<dataset>_<nbits>bits/ unless --work-dir is given
seed = 1
nbits = 64
feature_size = 4096        # D
max_frames = 25            # M

data = dict(
    feature_key="feats",
    # How database and queries are formed:
    #   train_as_database: database = the training file (+ train_labels), queries = query_* files
    #   separate:          database = db_* files, queries = query_* files
    #   all_vs_all:        database = queries = db_* files (every query is in the database)
    #   holdout:           one labelled file; a seeded `holdout_queries` fraction becomes the
    #                      queries, the rest is both the training set and the database
    protocol="train_as_database",
    train_feats="train_feats.h5",
    train_labels="train_labels.mat",
    train_label_key="labels",
    db_feats="",
    db_labels="",
    db_label_key="labels",
    query_feats="",
    query_labels="",
    query_label_key="labels",
    holdout_queries=0.2,
    holdout_seed=0,
)

preprocess = dict(
    latent_dim_pca=512,
    nclusters=100,
    kmeans_n_init=3,
    nearest_clusters=3,
    center_init="hadamard",    # hadamard | random
    center_alpha=1.0,          # weight of the semantic term
    center_rho=5e-5,           # initial ADMM penalty
    center_rho_growth=1.07,
    center_rho_max=1e9,
    center_max_iter=400,       # ADMM iterations per center and sweep
    center_sweeps=10,
    chunk_videos=1024,         # videos per read when mean-pooling the features
    # where the artifacts go: '' = beside the features (the release's layout); any other folder
    # keeps variants that change preprocessing (ablations) apart
    artifact_dir="",
    # True: use artifact files that carry no provenance record (e.g. the authors' release's) as
    # they are; otherwise such files stop the run (docs/method.md §10)
    release_artifacts=False,
    artifacts=dict(
        latent_feats="final_train_latent_feats.h5",
        anchors="final_train_anchors.h5",
        nearest="final_train_train_assit.h5",
        semantic="semantic.h5",
        hash_center="hash_center_{nbits}.h5",
        center_report="hash_center_{nbits}_report.json",
        cluster_record="preprocess_record.json",
        center_record="hash_center_{nbits}_record.json",
    ),
)

model = dict(
    variant="small",           # mini (depth 1) | small (6) | base (12)
    hidden_size=256,           # d
    decoder_hidden_size=192,
    decoder_depth=1,
    drop_path=0.5,             # DropPath rises linearly from 0 to this over the encoder depth
    mixer="mamba",             # mamba | lstm | attention | retention | rwkv
    mamba_impl="auto",         # auto | plain | triton | cuda (model/mamba.py says which is when)
    d_state=16,
    d_conv=4,
    expand=2,
    num_heads=4,               # attention / retention heads
    attention_impl="sdpa",     # sdpa (fused) | explicit (softmax(QK^T)V, memory grows with M^2)
    share_directions=False,    # True: both scan directions use one mixer (the authors' release)
    bidirectional=True,        # False: forward scans only (the unidirectional ablation)
    two_streams=False,         # on CUDA, the backward scans on a second stream (same numbers)
    #                            where the directions run apart (not on the Triton path: it
    #                            pairs them into one computation, model/s5vh.py)
    decoder_order="visible_first",  # visible_first (MAE-style, the release) | time
)

train = dict(
    batch_size=128,
    num_epochs=350,
    mask_ratio=0.5,
    lr=5e-4,
    min_lr=1e-5,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
    a_rec=1.0,                 # weight of the reconstruction loss (0: the ablation without it)
    alpha=1.0,                 # weight of the contrastive loss
    tau_plus=0.1,
    temperature=0.5,
    a_cluster=0.1,             # weight of the center-alignment loss
    temperature_cluster=0.5,
    warm_up_epoch=50,
    smoothing_beta=0.01,       # beta: rate of the label-smoothing update (the release: smoothing_alpha)
    trainable_centers=False,   # True: the release's random trainable bias-free classifier
    negatives="all",           # all | other_clusters: leave the anchor's own cluster out of its negatives
    device="auto",             # auto | cpu | cuda
    amp=True,                  # bf16 autocast on CUDA (ignored on CPU); mAP within seed noise of float32
    resident_dtype="float32",  # dtype of the training features kept on the device (bfloat16 halves it)
    cuda_graphs=True,          # on CUDA, replay full-batch steps as one captured graph
    compile=False,             # torch.compile (Inductor) the step's model and loss: faster steps, a slower start
    monitor="none",            # none | val | test: also log this mAP@R every eval_every epochs
    eval_every=50,             # epochs between evaluations (selection and monitoring)
    checkpoint_seconds=60,     # save last.pth when this much wall time has passed since the last save
    checkpoint_every=0,        # also every this many epochs (0: by time only); always at the end
    process_timeout=1800,      # several processes: seconds one waits for the others (evaluation on the first)
    select="last",             # last | val | test (the release: best test mAP@5)
    val_fraction=0.1,
    log_every=20,
)

eval = dict(
    topk=(5, 20, 40, 60, 80, 100),
    batch_size=512,            # videos per encoding batch
    query_chunk=1024,          # queries ranked at a time
)
