"""``--offline he``: the server computes the client's mask products ``W r`` under homomorphic encryption.

- bfv.py      the one BFV parameter set (SEAL), keys, plaintexts to and from numpy, ciphertext checks
- packing.py  Cheetah's coefficient encoding of a matrix product (no rotations, no Galois keys)
- service.py  the exchange's two sides: the client's limbs, encryption and decryption, the
              server's products; the messages (HE_SETUP, HE_PRODUCT)

protocols/offline.py's HESource drives it over a v2/v3/v3-2r session; protocols/masked.py's
server handler answers it.
"""
