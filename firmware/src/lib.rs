//! Firmware library (being written).
#![no_std]
