//! moe-contracts: parity contracts (schema, validation) and the metrics they are judged by.
