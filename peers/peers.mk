# `make test-peers`: the conformance suite against the real peer packages (peer_tests/).
#
# Each peer gets its own venv, .peer-venvs/<peer>/, because their dependency sets conflict. The
# venv is built once; its stamp depends on peers/<peer>.txt, which pins torch to the local CPU
# wheel and the peer to an exact version, so a second `make test-peers` rebuilds nothing. When a
# pin file changes, that venv is rebuilt from scratch, so no package of the old set lingers.
#
#   peers/saelens.txt              sae-lens             -> peer_tests/test_saelens{,_*}.py
#   peers/sparsify.txt             eai-sparsify         -> peer_tests/test_sparsify{,_*}.py
#   peers/dictionary_learning.txt  dictionary-learning  -> peer_tests/test_dictionary_learning{,_*}.py
#   peers/seed.txt                 sparse-autoencoder   -> peer_tests/test_seed{,_*}.py
#
# The pin file is both the requirements (-r: torch and the peer) and the constraints (-c: every
# later install in that venv, this repo's test dependencies included, keeps those pins).

PYTHON ?= python3
PEER_VENVS := .peer-venvs
PEERS := saelens sparsify dictionary_learning seed
PEER_STAMPS := $(foreach peer,$(PEERS),$(PEER_VENVS)/$(peer)/.installed-stamp)

.PHONY: test-peers peer-venvs

peer-venvs: $(PEER_STAMPS)

# torchvision: transformers imports it whenever it is installed, and the registry's torchvision is
# a CUDA build whose ops fail to register on the CPU torch, so it is removed where a peer pulled
# it in.
$(PEER_VENVS)/%/.installed-stamp: peers/%.txt
	rm -rf $(PEER_VENVS)/$*
	$(PYTHON) -m venv $(PEER_VENVS)/$*
	$(PEER_VENVS)/$*/bin/pip install --quiet -r peers/$*.txt -c peers/$*.txt
	$(PEER_VENVS)/$*/bin/pip install --quiet -c peers/$*.txt --no-deps -e .
	$(PEER_VENVS)/$*/bin/pip install --quiet -c peers/$*.txt jaxtyping beartype pytest hypothesis
	if $(PEER_VENVS)/$*/bin/pip show --quiet torchvision >/dev/null 2>&1; then \
	  $(PEER_VENVS)/$*/bin/pip uninstall --quiet --yes torchvision; fi
	touch $@

# Every peer's tests run, even when an earlier peer's fail; the target fails if any did.
test-peers: $(PEER_STAMPS)
	@status=0; for peer in $(PEERS); do \
	  files="$$(ls peer_tests/test_$$peer.py peer_tests/test_$${peer}_*.py 2>/dev/null)"; \
	  echo "== $$files ($(PEER_VENVS)/$$peer)"; \
	  $(PEER_VENVS)/$$peer/bin/python -m pytest -q $$files || status=1; \
	done; exit $$status
