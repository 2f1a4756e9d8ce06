"""Computing where the data is: ``f.map(points, on=LAYER)``.

The laptop looks the sweep up through its stack once; the misses go to
the host of ``LAYER`` (an ssh layer) in one ``compute_submit`` request,
and that host computes them the way its ``[compute]`` table says: a
process pool on the host (``executor = "local"``) or one Slurm job array
(``executor = "slurm"``). Each result is saved in the host's cache by the
worker that computed it, then fetched and back-filled into the laptop's
first layer as it lands.

Where each piece runs, and why:

* :mod:`.submit` (laptop): resolves ``on=``, packs the function and the
  points (opaque bytes: the server never unpickles them), polls, fetches,
  draws the bar, rebuilds failures.
* :mod:`.jobs` (server): a sweep as a directory (inputs, one state file
  per point, logs) and an index from key to the job computing it, so a
  rerun (or another laptop) attaches to a running point instead of
  submitting it again. Only plain files and JSON; nothing of the client's
  is unpickled in the server.
* :mod:`.local` and :mod:`.slurm` (server): start the workers, report
  their tasks' states.
* :mod:`.worker` (worker processes): the only place where the client's
  function and arguments are unpickled and run.
* :mod:`.code` (both): the digest that tells whether the host's copy of
  the function is the laptop's.
"""
