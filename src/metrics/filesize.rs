//! PNG and JPEG file sizes of uint8 images, from real encoders that match Pillow.
