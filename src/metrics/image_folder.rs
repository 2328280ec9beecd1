//! Folders of images (a FID reference set such as MS-COCO): listing and decoding.
//!
//! Files are found recursively and sorted by path; PNG, JPEG and WebP are read (by extension,
//! case-insensitive), converted to RGB as Pillow's `convert("RGB")` does (alpha dropped, grey
//! repeated), as float `[3, H, W]` in [0, 1] (`ToTensor`).
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ImageFolderError {
    #[error("{path}: {reason}")]
    Folder { path: PathBuf, reason: String },
    #[error("{path}: cannot read the image: {reason}")]
    Image { path: PathBuf, reason: String },
}

/// File extensions read, lower case.
pub const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Every image file under `dir` (recursively), sorted by path.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, ImageFolderError> {
    let folder = |reason: String| ImageFolderError::Folder { path: dir.to_path_buf(), reason };
    if !dir.is_dir() {
        return Err(folder("not a folder".into()));
    }
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current).map_err(|e| ImageFolderError::Folder { path: current.clone(), reason: e.to_string() })?;
        for entry in entries {
            let path = entry.map_err(|e| ImageFolderError::Folder { path: current.clone(), reason: e.to_string() })?.path();
            if path.is_dir() {
                pending.push(path);
            } else if is_image(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn is_jpeg(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg"))
}

/// An image file as float `[3, H, W]` in [0, 1].
pub fn read_rgb(path: &Path) -> Result<Tensor, ImageFolderError> {
    let fail = |reason: String| ImageFolderError::Image { path: path.to_path_buf(), reason };
    let (rgb, w, h) = if is_jpeg(path) {
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let mut decoder = jpeg_decoder::Decoder::new(std::io::BufReader::new(file));
        let pixels = decoder.decode().map_err(|e| fail(e.to_string()))?;
        let info = decoder.info().ok_or_else(|| fail("no image information after decoding".into()))?;
        let rgb = match info.pixel_format {
            jpeg_decoder::PixelFormat::RGB24 => pixels,
            jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            other => return Err(fail(format!("JPEG pixel format {other:?} (RGB and greyscale are read)"))),
        };
        (rgb, u32::from(info.width), u32::from(info.height))
    } else {
        let decoded = image::ImageReader::open(path).map_err(|e| fail(e.to_string()))?.with_guessed_format().map_err(|e| fail(e.to_string()))?.decode().map_err(|e| fail(e.to_string()))?;
        let rgb = decoded.to_rgb8();
        let (w, h) = (rgb.width(), rgb.height());
        (rgb.into_raw(), w, h)
    };
    if w == 0 || h == 0 {
        return Err(fail("the image is empty".into()));
    }
    Ok(Tensor::from_slice(&rgb).view([i64::from(h), i64::from(w), 3]).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_images_recursively_in_path_order_and_names_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        let pixels = vec![10u8, 20, 30, 40, 50, 60];
        image::save_buffer(dir.path().join("b/c/x.PNG"), &pixels, 2, 1, image::ExtendedColorType::Rgb8).unwrap();
        image::save_buffer(dir.path().join("a.png"), &pixels, 2, 1, image::ExtendedColorType::Rgb8).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        std::fs::write(dir.path().join("broken.jpg"), "not a jpeg").unwrap();
        let files = list_images(dir.path()).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string()).collect();
        assert_eq!(names, ["a.png", "b/c/x.PNG", "broken.jpg"]);
        let t = read_rgb(&files[0]).unwrap();
        assert_eq!(t.size(), [3, 1, 2]);
        assert!((t.double_value(&[1, 0, 1]) - 50.0 / 255.0).abs() < 1e-7, "channel-first, scaled to [0, 1]");
        let err = read_rgb(&files[2]).unwrap_err().to_string();
        assert!(err.contains("broken.jpg") && err.contains("cannot read"), "{err}");
        assert!(list_images(&dir.path().join("a.png")).unwrap_err().to_string().contains("not a folder"));
    }
}
