//! MixNN designer: the model owner's side. Builds onions and drives
//! init / forward / backward / test through a cascade of nodes.
