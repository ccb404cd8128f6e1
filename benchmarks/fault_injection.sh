#!/bin/bash
# Fault injection: plant each of three known bugs in assistant/inference.py, run the inference tests,
# report which test caught it, and restore the file. A bug no test catches is a hole in the suite.
cd "$(dirname "$0")/.."
F=assistant/inference.py
declare -a OLD NEW NAME
NAME[1]="swapped-order probability not inverted"; OLD[1]='p2 = None if p2s is None else 1.0 - p2s'; NEW[1]='p2 = p2s'
NAME[2]="verdict inverted"; OLD[2]='better = "A" if pa >= 0.5 else "B"'; NEW[2]='better = "B" if pa >= 0.5 else "A"'
NAME[3]="taxonomy words dropped from confidence"; OLD[3]='key_probs += self._taxonomy_token_probs(toks, chosen)'; NEW[3]='pass'
for i in 1 2 3; do
  cp $F /tmp/inference.bak
  python3 -c "import sys; p='$F'; s=open(p).read(); o=sys.argv[1]; n=sys.argv[2]; assert s.count(o)==1, o; open(p,'w').write(s.replace(o,n))" "${OLD[$i]}" "${NEW[$i]}"
  out=$(timeout 600 .venv/bin/python -m pytest -q -p no:cacheprovider tests/assistant/test_inference.py tests/assistant/test_caption.py 2>&1 | grep -E "^FAILED|passed|failed")
  cp /tmp/inference.bak $F
  echo "== bug $i: ${NAME[$i]}"; echo "$out"
done
git diff --stat $F
