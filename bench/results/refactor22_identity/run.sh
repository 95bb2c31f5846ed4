#!/bin/bash
# $1 = tree, $2 = out
cd $1  # run from the tree being checked, with that tree on the path
export MEGEDIT_DATA=/work/shared/data OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$1
/work/main/.venv/bin/python -c "import sys; from megedit.cli import main; import megedit; print(megedit.__file__, file=sys.stderr); sys.argv=['megedit']+sys.argv[1:]; sys.exit(main())" \
  edit hparams/MeG/smollm2-135m.yaml --data counterfact/counterfact-edit.json --n 100 \
  --probe-questions zsre/zsre_mend_train-1k.json --out $2
