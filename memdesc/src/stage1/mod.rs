//! Stage-1 translation table engine (issue 4; being written).
