"""v3-mpc: private two-party inference with every activation additively shared over Z_2^64.

The client's prompt stays private from the server, which has the hardware: every activation is
shared between the two, linear layers run on the server's share with masks the client
preprocessed, nonlinear layers by Beaver-triple MPC with secure comparisons, and only the
logits are revealed, to the client. The same code is a two-party simulator (both shares in one
process) or one party over the wire.

Modules:

- ``engine``: :class:`Engine`, the share arithmetic: sharing, openings, rounds of products,
  truncation; its comparisons and approximations come from two mixins:
- ``compare``: secure comparison (``ltz``) and relu, clip, the row max;
- ``approx``: exp, reciprocal, rsqrt, sigmoid, SiLU, GELU, softmax, with their ranges and errors;
- ``shares``: :class:`Shared` and its kinds, :class:`Lazy`, :class:`LazySum`;
- ``poly``: polynomials in shared variables, multiplied out in one round (lazy truncations);
- ``beaver``, ``beaver_ot``: triples and correlations from the client as dealer, or by OT;
- ``void``: the other party's slot in a party engine;
- ``weights``: the server's weights as ring integers with per-row power-of-two scales;
- ``executor``: :class:`MPCExecutor`, a model's plan on shares, and its public :class:`Ranges`;
- ``service``: the networked protocol (server handler, client, registered as ``v3-mpc``);
- ``lut``: v3-ot's core, nonlinear functions on shares by lookup tables over 1-of-N OT, and its
  tables (range, k, bytes, error); ``approx_lut``: :class:`LutEngine`, the engine with them
  (``v3-ot``: ``service_ot``, v3-mpc's session with that engine);
- ``millionaire``: v3-ot's comparisons, the carry of a two-party sum by the millionaires' protocol
  over 1-of-16 OT (CrypTFlow2), in :class:`LutEngine` instead of v3-mpc's Kogge-Stone adder;
- ``mux``: v3-ot's OT multiplexer (a shared bit times a shared value by two 1-of-2 OTs) and the
  product of a client bit and a server bit by one correlated OT (truncations' wrap bits);
- ``ideal``, ``accuracy``: the simulator with ideal products, and teacher-forced SmolLM2
  accuracy (``python -m shardlm.protocols.mpc.accuracy [N] [THREADS] ideal|beaver|ot``).
"""

from .engine import FRAC_BITS, Engine, Stats
from .executor import MPCExecutor, Ranges
from .shares import ClientBit, Lazy, LazySum, ServerBit, Shared, cat

__all__ = ["FRAC_BITS", "ClientBit", "Engine", "Lazy", "LazySum", "MPCExecutor", "Ranges", "ServerBit", "Shared",
           "Stats", "cat"]
