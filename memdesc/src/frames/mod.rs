//! Page array, descriptors, refcounts and the frame allocator (issue 3; being written).
