"""Reading runs trained with hrmloss: the second product beside the loss, on host arrays (numpy, scipy,
matplotlib, imported when a function needs them).

    positions.py   PositionLoss: per-token ce and kl accumulated per position, on the device
    fits.py        fits that carry their quality: power laws, loss-curve predictions, FLAGS, smoothing
    scaling.py     one scaling law across a grid of runs
    logs.py        readers: JSON lines, CSV, Hugging Face trainer_state.json, TensorBoard, the demo's JSON
    plots.py       the charts
    reports.py     `report` and `fit_grid`: fits + charts + summaries from runs
    demo.py        the main job: train, fine-tune against the reference, write everything
    cli.py         the command line (`hrmloss demo | report | fit-grid`)

The public names are re-exported lazily by `hrmloss` (e.g. `hrmloss.fit_power_law`).
"""
